-- The fleet service's schema. Laid out for Citus from the start (see
-- ARCHITECTURE.md, "How the service grows"): every clinic-owned table has
-- clinic_id in its primary key so it can be distributed by clinic_id, and the
-- shared library is a table of its own that can become a reference table.

CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE clinics (
    clinic_id       uuid PRIMARY KEY,
    name            text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    -- Whether original photographs may leave this clinic's devices.
    allow_originals boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE devices (
    device_id       uuid PRIMARY KEY,
    clinic_id       uuid NOT NULL REFERENCES clinics (clinic_id),
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    -- argon2id PHC string of the credential's secret; the secret itself is
    -- shown once, by `dermascope-cloud device add`, and stored nowhere.
    credential_hash text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz,
    last_seen_at    timestamptz
);
CREATE INDEX devices_by_clinic ON devices (clinic_id);

-- Encoders the service indexes. Each gets partial HNSW indexes over
-- `embedding::halfvec(dim)` on both case tables (`dermascope-cloud model add`),
-- so cases of several encoders and dimensions share one column.
CREATE TABLE models (
    model_id   text PRIMARY KEY CHECK (model_id ~ '^[A-Za-z0-9._-]{1,128}$'),
    dim        integer NOT NULL CHECK (dim BETWEEN 1 AND 4000),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Change sequences: a pull cursor is (reference seq, fleet seq). Writers take
-- a transaction-level advisory lock (per clinic, or the reference library's)
-- before drawing from them, so within a clinic seq order is commit order and
-- a cursor never skips a change that commits late.
CREATE SEQUENCE fleet_change_seq;
CREATE SEQUENCE reference_change_seq;

-- The newest revision of every case a clinic's devices uploaded.
CREATE TABLE fleet_cases (
    clinic_id       uuid NOT NULL REFERENCES clinics (clinic_id),
    case_id         text NOT NULL CHECK (length(case_id) BETWEEN 1 AND 256),
    revision        bigint NOT NULL CHECK (revision >= 1),
    device_id       uuid NOT NULL,
    model_id        text NOT NULL REFERENCES models (model_id),
    embedding       halfvec NOT NULL,
    diagnosis_code  text NOT NULL,
    diagnosis_name  text NOT NULL,
    label_confirmed boolean NOT NULL,
    metadata        jsonb NOT NULL DEFAULT '{}',
    -- lesion_id where the device gave one, else the case id: retrieval shows
    -- one photograph per lesion.
    lesion_key      text NOT NULL,
    thumbnail_jpeg  bytea NOT NULL,
    original_jpeg   bytea,
    created_at_ms   bigint NOT NULL,
    updated_at_ms   bigint NOT NULL,
    change_seq      bigint NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (clinic_id, case_id)
);
CREATE INDEX fleet_cases_changes ON fleet_cases (clinic_id, model_id, change_seq);

-- Every (case, revision) ever received, once: a retried batch finds its
-- rows here and is answered `already_stored` without writing.
CREATE TABLE case_revisions (
    clinic_id   uuid NOT NULL,
    case_id     text NOT NULL,
    revision    bigint NOT NULL,
    device_id   uuid NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (clinic_id, case_id, revision)
);

-- The shared reference library every clinic sees.
CREATE TABLE reference_cases (
    case_id         text PRIMARY KEY CHECK (length(case_id) BETWEEN 1 AND 256),
    revision        bigint NOT NULL CHECK (revision >= 1),
    model_id        text NOT NULL REFERENCES models (model_id),
    embedding       halfvec NOT NULL,
    diagnosis_code  text NOT NULL,
    diagnosis_name  text NOT NULL,
    label_confirmed boolean NOT NULL,
    metadata        jsonb NOT NULL DEFAULT '{}',
    lesion_key      text NOT NULL,
    thumbnail_jpeg  bytea NOT NULL,
    created_at_ms   bigint NOT NULL,
    updated_at_ms   bigint NOT NULL,
    change_seq      bigint NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reference_cases_changes ON reference_cases (model_id, change_seq);
