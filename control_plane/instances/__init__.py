"""Cloud instances: the data model, the lifecycle state machine, members and the instances API."""
