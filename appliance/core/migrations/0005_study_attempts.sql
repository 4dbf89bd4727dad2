-- Processing attempts per study revision (incremented each time the worker starts inferring it): a study
-- interrupted or failing pipeline.max_attempts times is ended `failed` instead of being retried for ever.
ALTER TABLE studies ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0
