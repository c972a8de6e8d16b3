"""Multi-user endpoints: one root agent, tasks run under each submitter's local account."""
