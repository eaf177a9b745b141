# MLflow tracking server with the PostgreSQL driver (the official image ships without it).
FROM python:3.11-slim
ARG MLFLOW_VERSION=3.17.2
RUN pip install --no-cache-dir "mlflow==${MLFLOW_VERSION}" psycopg2-binary
EXPOSE 5000
