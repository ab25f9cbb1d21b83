"""The one crash-safe record store of every long job: :mod:`.store` (a job's folder: its identity created
atomically, its records, its artefacts, one writer per process slot) on :mod:`.journal` (the append-only
multi-writer record log, atomic folder creation, writer locks)."""
