-- Signed bundles and their staged rollouts.
--
-- The service stores and serves bundles; it never signs them and devices
-- never trust it for their content: a device verifies the bundle's own
-- ed25519 signature and every file's sha256 after download. The archive's
-- sha256 here only lets a device detect a truncated or damaged download
-- before unpacking it.

-- What each device last said it runs (POST /v1/update, every sync cycle):
-- the fleet status page reads these.
ALTER TABLE devices
    ADD COLUMN daemon_version   text,
    ADD COLUMN bundle_version   bigint,
    ADD COLUMN encoder_model_id text,
    ADD COLUMN pending_uploads  bigint,
    ADD COLUMN reported_at      timestamptz;

-- A published bundle: an uncompressed tar of the bundle directory
-- (bundle.toml, bundle.toml.sig, encoder/ adapter/ library/ config/).
-- Two bundles may share a version (a signed downgrade re-issues an old
-- number); the same archive is published once.
CREATE TABLE bundles (
    bundle_id        uuid PRIMARY KEY,
    version          bigint NOT NULL CHECK (version >= 1),
    downgrade        boolean NOT NULL DEFAULT false,
    carries          text[] NOT NULL,
    encoder_model_id text,
    -- hex ed25519 public key that signed bundle.toml
    signed_by        text NOT NULL CHECK (signed_by ~ '^[0-9a-f]{64}$'),
    -- bundle.toml exactly as signed, for audits and the status page
    manifest         text NOT NULL,
    archive_sha256   text NOT NULL UNIQUE CHECK (archive_sha256 ~ '^[0-9a-f]{64}$'),
    archive_size     bigint NOT NULL CHECK (archive_size > 0),
    published_at     timestamptz NOT NULL DEFAULT now()
);

-- The archive in fixed 1 MiB pieces (the last one shorter), so a ranged
-- download reads only the pieces it needs and no row nears bytea's limits.
CREATE TABLE bundle_chunks (
    bundle_id uuid NOT NULL REFERENCES bundles (bundle_id) ON DELETE CASCADE,
    idx       integer NOT NULL CHECK (idx >= 0),
    data      bytea NOT NULL,
    PRIMARY KEY (bundle_id, idx)
);
-- Already dense (ONNX weights); compressing would cost CPU on every range.
ALTER TABLE bundle_chunks ALTER COLUMN data SET STORAGE EXTERNAL;

-- A rollout of one bundle to one clinic's devices, in ordered stages.
--   running:      the current stage's devices are offered the bundle; when
--                 installed/assigned >= success_threshold the next stage
--                 starts; when (failed+refused)/assigned >= error_threshold
--                 it pauses by itself (paused_reason says why)
--   paused:       nothing is offered; `resume` continues
--   rolling_back: devices that installed it are offered a rollback
--   rolled_back, done: finished (done = every stage reached its threshold)
CREATE TABLE rollouts (
    rollout_id        uuid PRIMARY KEY,
    bundle_id         uuid NOT NULL REFERENCES bundles (bundle_id),
    clinic_id         uuid NOT NULL REFERENCES clinics (clinic_id),
    state             text NOT NULL
        CHECK (state IN ('running', 'paused', 'rolling_back', 'rolled_back', 'done')),
    success_threshold real NOT NULL CHECK (success_threshold > 0 AND success_threshold <= 1),
    error_threshold   real NOT NULL CHECK (error_threshold > 0 AND error_threshold <= 1),
    current_stage     integer NOT NULL DEFAULT 0,
    paused_reason     text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
-- One rollout in flight per clinic: two would offer a device two bundles.
CREATE UNIQUE INDEX one_active_rollout_per_clinic ON rollouts (clinic_id)
    WHERE state IN ('running', 'paused', 'rolling_back');

-- Stages in order. `percent`: that share of the clinic's unrevoked devices
-- (rounded up, at least one), chosen among those not yet in the rollout by
-- md5(rollout_id || device_id) so the choice is stable and spread;
-- `devices`: the listed ones not yet in it; `rest`: every remaining device.
CREATE TABLE rollout_stages (
    rollout_id  uuid NOT NULL REFERENCES rollouts (rollout_id) ON DELETE CASCADE,
    stage       integer NOT NULL CHECK (stage >= 0),
    kind        text NOT NULL CHECK (kind IN ('percent', 'devices', 'rest')),
    percent     integer CHECK (percent BETWEEN 1 AND 100),
    device_ids  uuid[],
    started_at  timestamptz,
    finished_at timestamptz,
    PRIMARY KEY (rollout_id, stage),
    CHECK ((kind = 'percent') = (percent IS NOT NULL)),
    CHECK ((kind = 'devices') = (device_ids IS NOT NULL))
);

-- Every device a started stage took in, and where it is.
CREATE TABLE rollout_devices (
    rollout_id uuid NOT NULL REFERENCES rollouts (rollout_id) ON DELETE CASCADE,
    device_id  uuid NOT NULL REFERENCES devices (device_id),
    stage      integer NOT NULL,
    state      text NOT NULL CHECK (state IN
        ('offered', 'installed', 'refused', 'failed', 'rollback_offered', 'rolled_back')),
    detail     text CHECK (length(detail) <= 500),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX rollout_devices_by_device ON rollout_devices (device_id);

-- People who may read the fleet status page. The password is stored as an
-- argon2id hash only; a session is a random token kept as its sha256.
CREATE TABLE operators (
    name          text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9._@-]{1,100}$'),
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE operator_sessions (
    token_sha256 text PRIMARY KEY CHECK (token_sha256 ~ '^[0-9a-f]{64}$'),
    operator     text NOT NULL REFERENCES operators (name) ON DELETE CASCADE,
    expires_at   timestamptz NOT NULL
);
