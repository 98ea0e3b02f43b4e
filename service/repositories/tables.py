"""Core `Table` objects of the SQLModel classes, for SQLAlchemy Core statements."""

from __future__ import annotations

import sqlalchemy as sa

import models

source = models.metadata.tables["source"]
source_secret = models.metadata.tables["source_secret"]
api_key = models.metadata.tables["api_key"]
lead = models.metadata.tables["lead"]
lead_identity = models.metadata.tables["lead_identity"]
inbound_request = models.metadata.tables["inbound_request"]
inbound_event = models.metadata.tables["inbound_event"]
lead_merge = models.metadata.tables["lead_merge"]
pipeline_version = models.metadata.tables["pipeline_version"]
pipeline_slot = models.metadata.tables["pipeline_slot"]
score_record = models.metadata.tables["score_record"]
audit_entry = models.metadata.tables["audit_entry"]
delivery = models.metadata.tables["delivery"]
delivery_attempt = models.metadata.tables["delivery_attempt"]
routing_rules_version = models.metadata.tables["routing_rules_version"]
routing_activation = models.metadata.tables["routing_activation"]
routing_pool_member = models.metadata.tables["routing_pool_member"]
assignment = models.metadata.tables["assignment"]
account_owner = models.metadata.tables["account_owner"]
threshold_policy = models.metadata.tables["threshold_policy"]
threshold_policy_slot = models.metadata.tables["threshold_policy_slot"]
stage_transition = models.metadata.tables["stage_transition"]
change_request = models.metadata.tables["change_request"]
outcome = models.metadata.tables["outcome"]
source_api_token = models.metadata.tables["source_api_token"]
enrichment_job = models.metadata.tables["enrichment_job"]
enrichment_attempt = models.metadata.tables["enrichment_attempt"]


def insert_ignoring_conflicts(table: sa.Table, dialect: str) -> sa.Insert:
    """`INSERT ... ON CONFLICT DO NOTHING` for the connection's dialect."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table).on_conflict_do_nothing()
