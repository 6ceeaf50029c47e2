-- A fleet store as the SQLite-only fleet store (schema version 2, PRAGMA user_version) wrote it:
-- `sqlite3 fleet.db .dump` of a store with two devices, ten events, an artifact and a running rollout.
PRAGMA foreign_keys=OFF;
BEGIN TRANSACTION;
CREATE TABLE IF NOT EXISTS "events" (
   "id" TEXT NOT NULL,
   "device" TEXT NOT NULL,
   "seq" INTEGER NOT NULL,
   "kind" TEXT NOT NULL,
   "camera" TEXT,
   "captured_at" REAL NOT NULL,
   "recorded_at" REAL NOT NULL,
   "priority" INTEGER NOT NULL,
   "payload" TEXT NOT NULL,
   "batch" TEXT NOT NULL,
   "received_at" REAL NOT NULL
);
INSERT INTO events VALUES('01M8ST37HVKSBM7Q07RG6JWH42','cam-1',1,'health','c0',1767000000.0,1767000000.0,5,'{"i":0}','01M8ST37HVKSBM7Q07RG6JWH47',1767000001.0);
INSERT INTO events VALUES('01M8ST37HVKSBM7Q07RG6JWH43','cam-1',2,'health','c0',1767000001.0,1767000001.0,5,'{"i":1}','01M8ST37HVKSBM7Q07RG6JWH47',1767000001.0);
INSERT INTO events VALUES('01M8ST37HVKSBM7Q07RG6JWH44','cam-1',3,'health','c0',1767000002.0,1767000002.0,5,'{"i":2}','01M8ST37HVKSBM7Q07RG6JWH47',1767000001.0);
INSERT INTO events VALUES('01M8ST37HVKSBM7Q07RG6JWH45','cam-1',4,'health','c0',1767000003.0,1767000003.0,5,'{"i":3}','01M8ST37HVKSBM7Q07RG6JWH47',1767000001.0);
INSERT INTO events VALUES('01M8ST37HVKSBM7Q07RG6JWH46','cam-1',5,'health','c0',1767000004.0,1767000004.0,5,'{"i":4}','01M8ST37HVKSBM7Q07RG6JWH47',1767000001.0);
INSERT INTO events VALUES('01M8ST37HXF8XH6NWXRRZZ75XT','cam-2',1,'health','c0',1767000000.0,1767000000.0,5,'{"i":0}','01M8ST37HXF8XH6NWXRRZZ75XZ',1767000001.0);
INSERT INTO events VALUES('01M8ST37HXF8XH6NWXRRZZ75XV','cam-2',2,'health','c0',1767000001.0,1767000001.0,5,'{"i":1}','01M8ST37HXF8XH6NWXRRZZ75XZ',1767000001.0);
INSERT INTO events VALUES('01M8ST37HXF8XH6NWXRRZZ75XW','cam-2',3,'health','c0',1767000002.0,1767000002.0,5,'{"i":2}','01M8ST37HXF8XH6NWXRRZZ75XZ',1767000001.0);
INSERT INTO events VALUES('01M8ST37HXF8XH6NWXRRZZ75XX','cam-2',4,'health','c0',1767000003.0,1767000003.0,5,'{"i":3}','01M8ST37HXF8XH6NWXRRZZ75XZ',1767000001.0);
INSERT INTO events VALUES('01M8ST37HXF8XH6NWXRRZZ75XY','cam-2',5,'health','c0',1767000004.0,1767000004.0,5,'{"i":4}','01M8ST37HXF8XH6NWXRRZZ75XZ',1767000001.0);
CREATE TABLE IF NOT EXISTS "devices" (
   "id" TEXT PRIMARY KEY,
   "state" TEXT,
   "site" TEXT,
   "line" TEXT,
   "runtime" TEXT,
   "models" TEXT,
   "status_at" REAL,
   "first_seen" REAL NOT NULL,
   "last_seen" REAL NOT NULL,
   "events" INTEGER NOT NULL DEFAULT 0
, "state_since" REAL);
INSERT INTO devices VALUES('cam-1','online','plant-a','3','0.1.0','{"detector": "8.1.42-a"}',1767000000.0,1767000000.0,1767000001.0,5,1767000000.0);
INSERT INTO devices VALUES('cam-2','online','plant-a','3','0.1.0','{"detector": "8.1.42-a"}',1767000000.0,1767000000.0,1767000001.0,5,1767000000.0);
CREATE TABLE IF NOT EXISTS "artifacts" (
   "kind" TEXT,
   "name" TEXT,
   "version" TEXT,
   "sha256" TEXT NOT NULL,
   "size" INTEGER NOT NULL,
   "doc" TEXT NOT NULL,
   "pushed_at" REAL NOT NULL,
   "pushed_by" TEXT,
   PRIMARY KEY ("kind", "name", "version")
);
INSERT INTO artifacts VALUES('model','yolov8n','8.1.42-b','9cb7487000bc86ac36ce83c4acfabe8878552be99572a6770f65ab1d048a5c48',11,'{"kind":"model","name":"yolov8n","version":"8.1.42-b","sha256":"9cb7487000bc86ac36ce83c4acfabe8878552be99572a6770f65ab1d048a5c48","size":11,"manifest":{"name":"yolov8n"},"signature":"c2ln"}',1767000000.0,'operator');
CREATE TABLE IF NOT EXISTS "desired" (
   "device" TEXT PRIMARY KEY,
   "version" INTEGER NOT NULL,
   "doc" TEXT NOT NULL,
   "updated_at" REAL NOT NULL
);
INSERT INTO desired VALUES('cam-1',1767000000000,'{"v":1,"device":"cam-1","version":1767000000000,"at":1767000000.0,"models":{"detector":{"artifact":{"kind":"model","name":"yolov8n","version":"8.1.42-b","sha256":"9cb7487000bc86ac36ce83c4acfabe8878552be99572a6770f65ab1d048a5c48","size":11,"manifest":{"name":"yolov8n"},"signature":"c2ln"},"job":"r0001"}},"policy":null}',1767000000.0);
CREATE TABLE IF NOT EXISTS "reported" (
   "device" TEXT PRIMARY KEY,
   "doc" TEXT NOT NULL,
   "at" REAL,
   "received_at" REAL NOT NULL
);
INSERT INTO reported VALUES('cam-1','{"v":1,"device":"cam-1","at":1767000002.0,"desired_version":1767000000000,"models":{"detector":{"name":"yolov8n","version":"8.1.42-b","sha256":"9cb7487000bc86ac36ce83c4acfabe8878552be99572a6770f65ab1d048a5c48"}},"previous":{},"policy":null,"last_change":null}',1767000002.0,1767000002.0);
CREATE TABLE IF NOT EXISTS "rollouts" (
   "id" TEXT PRIMARY KEY,
   "seq" INTEGER NOT NULL,
   "kind" TEXT NOT NULL,
   "slot" TEXT NOT NULL,
   "state" TEXT NOT NULL,
   "stage" INTEGER NOT NULL,
   "spec" TEXT NOT NULL,
   "reason" TEXT,
   "created_by" TEXT,
   "created_at" REAL NOT NULL,
   "updated_at" REAL NOT NULL
);
INSERT INTO rollouts VALUES('r0001',1,'model','detector','running',0,'{"kind":"model","name":"yolov8n","version":"8.1.42-b","sha256":"9cb7487000bc86ac36ce83c4acfabe8878552be99572a6770f65ab1d048a5c48","slot":"detector","target":{"ids":["cam-1","cam-2"],"tags":null},"devices":["cam-1","cam-2"],"bounds":[1,2],"canary":1,"waves":[100.0],"health_window_s":1.0,"abort_failure_pct":20.0,"min_executed":1,"job_timeout_s":null}',NULL,'operator',1767000000.0,1767000000.0);
CREATE TABLE IF NOT EXISTS "executions" (
   "rollout" TEXT,
   "device" TEXT,
   "stage" INTEGER NOT NULL,
   "state" TEXT NOT NULL,
   "job_state" TEXT,
   "reason" TEXT,
   "previous" TEXT,
   "assigned_at" REAL,
   "assigned_version" INTEGER,
   "active_at" REAL,
   "finished_at" REAL,
   "revert" TEXT,
   "revert_reason" TEXT,
   "revert_version" INTEGER,
   "updated_at" REAL NOT NULL,
   PRIMARY KEY ("rollout", "device")
);
INSERT INTO executions VALUES('r0001','cam-1',0,'active','active',NULL,NULL,1767000000.0,1767000000000,1767000002.0,NULL,NULL,NULL,NULL,1767000002.0);
INSERT INTO executions VALUES('r0001','cam-2',1,'pending',NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,1767000000.0);
CREATE TABLE IF NOT EXISTS "jobs" (
   "device" TEXT NOT NULL,
   "job" TEXT NOT NULL,
   "slot" TEXT,
   "sha256" TEXT,
   "state" TEXT NOT NULL,
   "reason" TEXT,
   "at" REAL,
   "received_at" REAL NOT NULL
);
INSERT INTO jobs VALUES('cam-1','r0001','detector','9cb7487000bc86ac36ce83c4acfabe8878552be99572a6770f65ab1d048a5c48','downloading',NULL,1767000001.0,1767000001.0);
INSERT INTO jobs VALUES('cam-1','r0001','detector','9cb7487000bc86ac36ce83c4acfabe8878552be99572a6770f65ab1d048a5c48','active',NULL,1767000001.0,1767000001.0);
CREATE UNIQUE INDEX "events_by_id"
    ON "events" ("id");
CREATE INDEX "events_by_device"
    ON "events" ("device", "id");
CREATE INDEX "events_by_kind"
    ON "events" ("kind", "id");
CREATE INDEX "artifacts_by_sha"
    ON "artifacts" ("sha256");
CREATE INDEX "jobs_by_device"
    ON "jobs" ("device", "job");
COMMIT;
PRAGMA user_version=2;
