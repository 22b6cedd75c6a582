-- Run once by the postgres image on an empty data directory (docker-entrypoint-initdb.d), as the
-- POSTGRES_USER from compose.yaml (the superuser, used by no service).
--
-- Least privilege: each service logs in as its own role, which owns its database (its migrations
-- create the tables) and may connect to no other. The load generator only counts the points
-- consumer's effects, so it may connect to `points` and read what the points role creates there.
-- The `compose_postgres` suite runs this file on a private cluster and checks each of these rules
-- with the URLs compose.yaml gives the services. Change the passwords for anything but a demo.
CREATE ROLE callback LOGIN PASSWORD 'callback';
CREATE ROLE orders LOGIN PASSWORD 'orders';
CREATE ROLE points LOGIN PASSWORD 'points';
CREATE ROLE loadgen LOGIN PASSWORD 'loadgen';

CREATE DATABASE callback OWNER callback; -- callback-service store
CREATE DATABASE orders OWNER orders;     -- upstream-demo order store
CREATE DATABASE points OWNER points;     -- downstream-demo points and inbox; read by `upstream-demo load`
-- PUBLIC may connect to a new database by default; only the owner (and loadgen on points) may.
REVOKE ALL ON DATABASE callback, orders, points FROM PUBLIC;
GRANT CONNECT ON DATABASE points TO loadgen;

\connect points
ALTER DEFAULT PRIVILEGES FOR ROLE points IN SCHEMA public GRANT SELECT ON TABLES TO loadgen;
