"""Tables, migrations, the database access layer and the Redis client: what every layer
above (carriers, escalation, ivr, api) keeps its state in."""
