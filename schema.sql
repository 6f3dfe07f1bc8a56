-- Dark Tower control plane schema (SPEC §5). Hand-written and idempotent:
-- applying it twice is harmless. The GC applies it at start under an advisory
-- lock; `dt db init` does the same explicitly.

CREATE TABLE IF NOT EXISTS meetings (
    meeting_id        uuid PRIMARY KEY,
    org_id            uuid NOT NULL,
    meeting_code      text NOT NULL CHECK (meeting_code ~ '^[a-z0-9-]{3,32}$'),
    display_name      text NOT NULL CHECK (char_length(display_name) BETWEEN 1 AND 200),
    created_by        text NOT NULL CHECK (char_length(created_by) BETWEEN 1 AND 255),
    allow_guests      boolean NOT NULL DEFAULT false,
    max_participants  integer NOT NULL DEFAULT 100 CHECK (max_participants > 0),
    status            text NOT NULL DEFAULT 'scheduled'
                      CHECK (status IN ('scheduled', 'active', 'ended', 'cancelled')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    last_active_at    timestamptz,
    CONSTRAINT meetings_org_code_unique UNIQUE (org_id, meeting_code)
);

-- Codes are unique across orgs too: a guest join names a meeting by its code
-- alone (SPEC §6.5). The per-org constraint stays (it is what §5 promises).
CREATE UNIQUE INDEX IF NOT EXISTS meetings_code_unique ON meetings (meeting_code);

CREATE TABLE IF NOT EXISTS meeting_controllers (
    controller_id          text PRIMARY KEY
                           CHECK (controller_id ~ '^[A-Za-z0-9_-]{1,255}$'),
    region                 text NOT NULL CHECK (char_length(region) BETWEEN 1 AND 50),
    grpc_endpoint          text NOT NULL CHECK (char_length(grpc_endpoint) BETWEEN 1 AND 255),
    webtransport_endpoint  text NOT NULL
                           CHECK (char_length(webtransport_endpoint) BETWEEN 1 AND 255),
    max_meetings           integer NOT NULL CHECK (max_meetings > 0),
    current_meetings       integer NOT NULL DEFAULT 0 CHECK (current_meetings >= 0),
    max_participants       integer NOT NULL CHECK (max_participants > 0),
    current_participants   integer NOT NULL DEFAULT 0 CHECK (current_participants >= 0),
    health_status          text NOT NULL DEFAULT 'pending'
                           CHECK (health_status IN
                                  ('pending', 'healthy', 'degraded', 'unhealthy', 'draining')),
    cpu_usage_percent      real,
    memory_usage_percent   real,
    last_heartbeat_at      timestamptz NOT NULL DEFAULT now(),
    registered_at          timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now()
);

-- Candidate MCs for a join: healthy, in a region, least loaded first.
CREATE INDEX IF NOT EXISTS meeting_controllers_candidates_idx
    ON meeting_controllers (region, current_meetings, last_heartbeat_at DESC)
    WHERE health_status = 'healthy';
-- The health checker's sweep: live nodes by heartbeat age.
CREATE INDEX IF NOT EXISTS meeting_controllers_stale_idx
    ON meeting_controllers (last_heartbeat_at)
    WHERE health_status IN ('pending', 'healthy', 'degraded');

CREATE TABLE IF NOT EXISTS media_handlers (
    handler_id               text PRIMARY KEY CHECK (handler_id ~ '^[A-Za-z0-9_-]{1,255}$'),
    region                   text NOT NULL CHECK (char_length(region) BETWEEN 1 AND 50),
    zone                     text NOT NULL DEFAULT '' CHECK (char_length(zone) <= 50),
    webtransport_endpoint    text NOT NULL
                             CHECK (char_length(webtransport_endpoint) BETWEEN 1 AND 255),
    grpc_endpoint            text NOT NULL CHECK (char_length(grpc_endpoint) BETWEEN 1 AND 255),
    max_streams              integer NOT NULL CHECK (max_streams > 0),
    current_streams          integer NOT NULL DEFAULT 0 CHECK (current_streams >= 0),
    health_status            text NOT NULL DEFAULT 'pending'
                             CHECK (health_status IN
                                    ('pending', 'healthy', 'degraded', 'unhealthy', 'draining')),
    cpu_usage_percent        real,
    memory_usage_percent     real,
    bandwidth_usage_percent  real,
    last_heartbeat_at        timestamptz NOT NULL DEFAULT now(),
    registered_at            timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS media_handlers_candidates_idx
    ON media_handlers (region, current_streams)
    WHERE health_status IN ('healthy', 'degraded');
CREATE INDEX IF NOT EXISTS media_handlers_stale_idx
    ON media_handlers (last_heartbeat_at)
    WHERE health_status IN ('pending', 'healthy', 'degraded');

-- The fencing token (SPEC §6.3 step 4, §7.3): monotonic across the region.
CREATE SEQUENCE IF NOT EXISTS meeting_generation_seq AS bigint START WITH 1;

CREATE TABLE IF NOT EXISTS meeting_assignments (
    meeting_id             uuid NOT NULL,
    region                 text NOT NULL CHECK (char_length(region) BETWEEN 1 AND 50),
    meeting_controller_id  text NOT NULL REFERENCES meeting_controllers (controller_id),
    generation             bigint NOT NULL CHECK (generation > 0),
    assigned_at            timestamptz NOT NULL DEFAULT now(),
    assigned_by_gc_id      text NOT NULL,
    ended_at               timestamptz,
    -- The media handlers handed to the MC and to clients with the assignment;
    -- no backup when the region has a single MH.
    primary_mh_id          text NOT NULL REFERENCES media_handlers (handler_id),
    backup_mh_id           text REFERENCES media_handlers (handler_id),
    -- One row per meeting and region: a replacement overwrites the old
    -- assignment in place (there is no history of earlier assignments).
    PRIMARY KEY (meeting_id, region),
    CONSTRAINT meeting_assignments_distinct_mhs CHECK (backup_mh_id <> primary_mh_id)
);

-- Active assignments of one MC (channel invalidation, orphan release, status).
CREATE INDEX IF NOT EXISTS meeting_assignments_active_by_mc_idx
    ON meeting_assignments (meeting_controller_id)
    WHERE ended_at IS NULL;
-- Cleanup: ended assignments by age.
CREATE INDEX IF NOT EXISTS meeting_assignments_ended_idx
    ON meeting_assignments (ended_at)
    WHERE ended_at IS NOT NULL;

-- Who may assign a meeting right now (one row per meeting and region): the
-- holder draws the generation and calls an MC; other joins of the meeting
-- wait for its record or for the lease to expire (database clock). Every
-- generation of a meeting is thus drawn by a lease holder, so the recorded
-- assignment always carries the newest one (see gc/repositories/assignments.py).
CREATE TABLE IF NOT EXISTS meeting_assignment_leases (
    meeting_id  uuid NOT NULL,
    region      text NOT NULL CHECK (char_length(region) BETWEEN 1 AND 50),
    -- NULL once a record consumed the lease (it is free again).
    holder      uuid,
    gc_id       text NOT NULL,
    expires_at  timestamptz NOT NULL,
    -- The generation last recorded under this lease: lets a join that takes
    -- the lease notice a record its snapshot missed.
    recorded_generation bigint,
    PRIMARY KEY (meeting_id, region)
);
-- Databases created before the lease kept its recorded generation. Checked
-- first, so that a GC starting next to busy ones takes no table lock.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = 'meeting_assignment_leases'
          AND column_name = 'recorded_generation')
    THEN
        ALTER TABLE meeting_assignment_leases
            ALTER COLUMN holder DROP NOT NULL,
            ADD COLUMN recorded_generation bigint;
    END IF;
END
$$;
