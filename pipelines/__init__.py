"""End-to-end and scheduled jobs: what ``ray job submit`` and ``make demo`` run."""
