"""Request and response bodies of the API's own routes (pydantic), one module per area. The
OpenAI wire format is auditor.api.openai.protocol; the field types and ceilings both are built
from are auditor.schemas."""

from auditor.api.schemas.audits import AuditCreate, AuditFlag, AuditItem, AuditRead, AuditScore
from auditor.api.schemas.concepts import ConceptCreate, ConceptRead, ContrastivePair, ExtractionCreate
from auditor.api.schemas.errors import ErrorBody, ErrorDetail, OpenAIError
from auditor.api.schemas.health import Health, ModelRead
from auditor.api.schemas.jobs import AnswerCalibrationRead, CalibrationCreate, CalibrationRead, JobAccepted, JobRead
from auditor.api.schemas.tokens import AdminActionRead, TokenCreate, TokenIssued, TokenRead

__all__ = [
    "AdminActionRead",
    "AnswerCalibrationRead",
    "AuditCreate",
    "AuditFlag",
    "AuditItem",
    "AuditRead",
    "AuditScore",
    "CalibrationCreate",
    "CalibrationRead",
    "ConceptCreate",
    "ConceptRead",
    "ContrastivePair",
    "ErrorBody",
    "ErrorDetail",
    "ExtractionCreate",
    "Health",
    "JobAccepted",
    "JobRead",
    "ModelRead",
    "OpenAIError",
    "TokenCreate",
    "TokenIssued",
    "TokenRead",
]
