import numpy as np
import pandas as pd
import pytest

from vae_models.schema import SchemaError, TableSchema, infer_schema


def test_infers_kinds_and_leaves_out_unmodellable_columns(flights):
    schema = infer_schema(flights, key="rownames")
    kinds = {c.name: c.kind for c in schema.columns}
    assert kinds["dep_delay"] == "numeric"
    assert kinds["carrier"] == "categorical"
    assert kinds["origin"] == "categorical"  # 3 airports
    assert "rownames" not in kinds  # the key is carried, not modelled
    assert schema.ignored["year"] == "constant column"
    assert schema.ignored["tailnum"].startswith("high-cardinality text")
    assert schema.ignored["time_hour"].startswith("high-cardinality text")


def test_binary_override_and_all_null():
    df = pd.DataFrame(
        {"flag": [True, False, True], "n": [1, 2, 3], "empty": [None, None, None], "x": [1.0, 2.5, 4.0]}
    )
    schema = infer_schema(df, overrides={"n": "categorical"})
    kinds = {c.name: c.kind for c in schema.columns}
    assert kinds == {"flag": "binary", "n": "categorical", "x": "numeric"}
    assert schema.ignored == {"empty": "all values are null"}


def test_non_numeric_string_in_numeric_column_names_column_and_value():
    df = pd.DataFrame({"price": [str(i) for i in range(300)] + ["abc"], "c": ["a", "b"] * 150 + ["a"]})
    with pytest.raises(SchemaError, match=r"column 'price'.*'abc'"):
        infer_schema(df)


def test_infinite_values_are_rejected_with_the_column_name():
    df = pd.DataFrame({"x": [1.0, np.inf, 3.0, 4.0], "y": [1.0, 2.0, 3.0, 5.0]})
    with pytest.raises(SchemaError, match=r"column 'x' holds 1 infinite"):
        infer_schema(df)


def test_encode_masks_nulls_and_maps_unknown_levels_to_reserved_slot(flights):
    schema = infer_schema(flights, key="rownames")
    new = flights.head(3).copy()
    new.loc[0, "carrier"] = "ZZ"  # never seen in training
    new.loc[1, "carrier"] = None
    new.loc[2, "dep_delay"] = np.nan
    enc = schema.encode(new)
    j = [c.name for c in schema.categorical].index("carrier")
    spec = schema.categorical[j]
    assert enc.x_cat[0, j] == spec.n_classes - 1 and enc.m_cat[0, j] == 1
    assert enc.m_cat[1, j] == 0
    k = [c.name for c in schema.numeric].index("dep_delay")
    assert enc.m_num[2, k] == 0 and enc.x_num[2, k] == 0


def test_decode_inverts_encode_and_restores_dtypes(flights):
    schema = infer_schema(flights, key="rownames")
    df = flights.dropna().head(50)
    enc = schema.encode(df)
    out = schema.decode(enc.x_num, enc.x_cat)
    np.testing.assert_allclose(
        out["dep_delay"].to_numpy(float), df["dep_delay"].to_numpy(float), rtol=1e-4, atol=1e-3
    )
    assert (out["carrier"].to_numpy() == df["carrier"].to_numpy()).all()
    assert str(out["distance"].dtype) == "Int64"  # integer column comes back as integers
    assert (out["distance"].to_numpy(int) == df["distance"].to_numpy()).all()


def test_schema_round_trips_through_json(flights):
    schema = infer_schema(flights, key="rownames")
    again = TableSchema.from_dict(schema.to_dict())
    np.testing.assert_array_equal(again.encode(flights).x_cat, schema.encode(flights).x_cat)


def test_missing_column_at_scoring_time_is_named(flights):
    schema = infer_schema(flights, key="rownames")
    with pytest.raises(SchemaError, match="'dep_delay'"):
        schema.encode(flights.drop(columns=["dep_delay"]))


def test_skewed_positive_column_gets_log_transform():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"amount": rng.lognormal(3, 1.5, 2000), "other": rng.normal(size=2000)})
    schema = infer_schema(df)
    assert {c.name: c.transform for c in schema.columns} == {"amount": "log1p", "other": "identity"}
    enc = schema.encode(df)
    out = schema.decode(enc.x_num, enc.x_cat)
    np.testing.assert_allclose(out["amount"], df["amount"], rtol=1e-3)


def test_arrow_and_object_text_columns_encode_alike(flights):
    """Levels are looked up in Arrow for pandas' Arrow-backed strings, by a hash index otherwise."""
    schema = infer_schema(flights, key="rownames")
    new = flights.head(200).copy()
    new.loc[3, "carrier"] = "ZZ"  # unseen level
    new.loc[4, "carrier"] = None
    arrow = new.astype({"carrier": pd.StringDtype("pyarrow"), "origin": pd.StringDtype("pyarrow")})
    plain = new.astype({"carrier": object, "origin": object})
    a, b = schema.encode(arrow), schema.encode(plain)
    np.testing.assert_array_equal(a.x_cat, b.x_cat)
    np.testing.assert_array_equal(a.m_cat, b.m_cat)
    j = [c.name for c in schema.categorical].index("carrier")
    spec = schema.categorical[j]
    assert a.x_cat[3, j] == spec.n_classes - 1 and a.m_cat[4, j] == 0
    assert a.x_cat[0, j] == spec.categories.index(new.loc[0, "carrier"])
