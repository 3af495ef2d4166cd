"""The model client (SPEC §6.4, §9): requests, error classification, endpoint checks and the token budget.

Nothing here knows about extraction or consolidation: callers pass a system prompt, a user prompt and a JSON
schema, and get a parsed JSON object back.
"""
