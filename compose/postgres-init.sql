-- Run once by the postgres image on an empty data directory (docker-entrypoint-initdb.d), as the
-- POSTGRES_USER from compose.yaml, who owns the new databases.
CREATE DATABASE callback; -- callback-service store
CREATE DATABASE orders;   -- upstream-demo order store
CREATE DATABASE points;   -- downstream-demo points and inbox; read by `upstream-demo load`
