-- The schema of a SQLite registry as cotune wrote it before its migrations were Alembic's
-- (schema 4, commit 6a2be18): what tests start from to show that such a registry migrates.
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    admin INTEGER NOT NULL,
    quotas TEXT NOT NULL,  -- JSON of Quotas
    created REAL NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0  -- 1 once deleted, since schema 3: see below
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name),
    hash TEXT NOT NULL,  -- sha256 hex of the secret, which itself is never stored
    description TEXT NOT NULL,
    created REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tokens_by_tenant ON tokens(tenant);
CREATE TABLE IF NOT EXISTS adapters (  -- a row exists while the adapter has a version
    id INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name),
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    labels TEXT NOT NULL,  -- JSON object of strings
    created REAL NOT NULL,
    updated REAL NOT NULL,
    UNIQUE (tenant, name)
);
-- The next version of every adapter name a tenant ever published. Kept apart from adapters,
-- whose row goes with the last version, so that a version number is never reused.
CREATE TABLE IF NOT EXISTS version_counters (
    tenant TEXT NOT NULL REFERENCES tenants(name),
    name TEXT NOT NULL,
    next_version INTEGER NOT NULL,
    PRIMARY KEY (tenant, name)
);
CREATE TABLE IF NOT EXISTS versions (
    adapter_id INTEGER NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    alpha REAL NOT NULL,
    target_modules TEXT NOT NULL,  -- JSON list of strings
    size_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,  -- of adapter_model.safetensors
    provenance TEXT NOT NULL,  -- JSON object
    created REAL NOT NULL,
    blob_id TEXT NOT NULL UNIQUE,
    PRIMARY KEY (adapter_id, version)
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name),
    adapter TEXT NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,  -- JSON object
    error TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    versions TEXT NOT NULL,  -- JSON list of the versions the job published
    progress TEXT NOT NULL,  -- JSON object, the latest report
    owner TEXT NOT NULL DEFAULT '',  -- the worker that runs it (its id), since schema 2
    training_file TEXT NOT NULL DEFAULT ''  -- the file id it trains on, since schema 4
);
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs(tenant, created, id);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, created, id);
-- What ListJobEvents shows after the fact. A job's events go with it (its tenant's deletion).
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    sequence INTEGER NOT NULL,  -- from 1 per job
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,  -- JSON object
    PRIMARY KEY (job_id, sequence)
);
-- A file's bytes are data_dir/files/<id>, written before its row and removed after it.
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name),
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_tenant ON files(tenant, created, id);
PRAGMA user_version = 4;
