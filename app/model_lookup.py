"""Finding a project's fine-tuned models. Every query here filters by project, so no caller (the models API,
serving, job checks, the worker continuing a model) can forget the filter that makes another project's model
look absent."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.tables import FineTunedModel


def find_fine_tuned_model(session: Session, project_id: str, model_id: str) -> FineTunedModel | None:
    return session.scalar(
        select(FineTunedModel).where(FineTunedModel.id == model_id, FineTunedModel.project_id == project_id)
    )


def project_fine_tuned_models(session: Session, project_id: str) -> list[FineTunedModel]:
    """Oldest first."""
    query = select(FineTunedModel).where(FineTunedModel.project_id == project_id)
    return list(session.scalars(query.order_by(FineTunedModel.created_at)))


def job_fine_tuned_models(session: Session, project_id: str, job_id: str) -> list[FineTunedModel]:
    """Everything a job published: its final model and its checkpoint models."""
    query = select(FineTunedModel).where(FineTunedModel.project_id == project_id, FineTunedModel.job_id == job_id)
    return list(session.scalars(query))
