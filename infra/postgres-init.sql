-- One server, three databases: the warehouse (POSTGRES_DB), MLflow's store and Prefect's.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
