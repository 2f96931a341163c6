-- One PostgreSQL for the local stack: mmcds's store and HAPI FHIR's database, separate users.
CREATE USER hapi WITH PASSWORD 'hapi-local-only';
CREATE DATABASE hapi OWNER hapi;
