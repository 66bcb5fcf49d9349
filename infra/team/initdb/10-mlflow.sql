CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;  -- the basic-auth app's users (its own alembic history)
