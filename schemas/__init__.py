"""Pydantic models shared by the gateway and the workers: requests, job records, wire envelopes."""
