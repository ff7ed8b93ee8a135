"""/admin/concepts: register (JSON or file upload), extract from contrastive pairs (a job on a
worker: 202 with the job to poll), list, get, activate / deactivate, retire, export. Every
registration is validated in full before anything is written."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile, status

from auditor.access import audit_log
from auditor.api import dispatching
from auditor.api.deps import FingerprintDep, ReadSessionDep, RowId, SessionDep, SettingsDep
from auditor.api.limits import check_extraction
from auditor.api.schemas import ConceptCreate, ConceptRead, ExtractionCreate, JobAccepted
from auditor.api.security import PrincipalDep
from auditor.db import store
from auditor.db.enums import ConceptSource, JobKind
from auditor.db.labels import version_label
from auditor.db.models import Concept
from auditor.errors import ConceptNotFound, InvalidInputError
from auditor.model_identity import ModelFingerprint
from auditor.queue.dispatch import TASK_EXTRACT
from auditor.schemas import NAME_PATTERN, Text
from auditor.vectors import FORMATS, VectorSet, export_vectors, parse_vectors, sniff_format
from probes.concepts import concept_from_dict

router = APIRouter(prefix="/admin/concepts", tags=["admin: concepts"])

MEDIA_TYPES = {
    "json": "application/json",
    "safetensors": "application/octet-stream",
    "gguf": "application/octet-stream",
}


def concept_read(session, concept: Concept) -> ConceptRead:
    layers = sorted(store.concept_vectors(session, concept_id=concept.id))
    return ConceptRead.model_validate(
        {**{c: getattr(concept, c) for c in ConceptRead.model_fields if c != "layers"}, "layers": layers}
    )


def _check_fingerprint(claimed: str | None, fingerprint: ModelFingerprint) -> None:
    if claimed and claimed != fingerprint.hash:
        raise InvalidInputError(
            f"vector was made for model fingerprint {claimed[:12]}…, but this deployment serves "
            f"{fingerprint.model_id} ({fingerprint.hash[:12]}…): a vector only means something "
            "in the basis it was extracted in"
        )


def _register(
    session,
    *,
    name: str,
    description: str,
    vector_set: VectorSet,
    primary_layer: int | None,
    source: str,
    fingerprint: ModelFingerprint,
    principal,
) -> Concept:
    layers = sorted(vector_set.vectors)
    if primary_layer is None:
        primary_layer = layers[len(layers) // 2]
    elif primary_layer not in vector_set.vectors:
        raise InvalidInputError(f"primary_layer {primary_layer} has no vector (given layers: {layers})")
    concept = store.add_concept_version(
        session,
        name=name,
        description=description,
        vectors=vector_set.vectors,
        primary_layer=primary_layer,
        created_by=principal.name,
        **fingerprint.provenance(),
        method="upload",
        pooling="n/a",
        source=source,
        provenance=_json_safe(vector_set.metadata),
    )
    _log(session, principal, "concept.register", concept, source=source, layers=layers)
    session.commit()
    return concept


def _log(session, principal, action: str, concept: Concept, **details) -> None:
    audit_log.record(
        session,
        actor=principal,
        action=action,
        target=f"concept:{version_label(concept.name, concept.version)}",
        vector_hash=concept.vector_hash,
        details={"concept_id": concept.id, **details},
    )


def _json_safe(metadata: dict) -> dict:
    """File metadata as stored provenance (JSON object keys must be strings)."""
    norms = metadata.get("original_norms", {})
    return {**metadata, "original_norms": {str(layer): norm for layer, norm in norms.items()}}


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ConceptRead)
def register_json(
    body: ConceptCreate, session: SessionDep, fingerprint: FingerprintDep, principal: PrincipalDep
) -> ConceptRead:
    """Register the next version of a concept from vectors sent as JSON."""
    _check_fingerprint(body.model_fingerprint, fingerprint)
    if (body.vector is None) == (body.vectors is None):
        raise InvalidInputError("send either `vector` with `layer`, or `vectors` (layer -> vector)")
    if body.vector is not None and body.layer is None:
        raise InvalidInputError("`vector` needs `layer`")
    document = {"vectors": {str(k): v for k, v in (body.vectors or {body.layer: body.vector}).items()}}
    vector_set = parse_vectors(
        json.dumps(document).encode(), "json", d_model=fingerprint.d_model, n_layers=fingerprint.n_layers
    )
    concept = _register(
        session,
        name=body.name,
        description=body.description,
        vector_set=vector_set,
        primary_layer=body.primary_layer,
        source=ConceptSource.UPLOAD_JSON,
        fingerprint=fingerprint,
        principal=principal,
    )
    return concept_read(session, concept)


# A plain `def`, so FastAPI runs it in its threadpool: parsing a file (up to MAX_UPLOAD_BYTES) and
# the database writes must not hold the event loop, which serves every other request meanwhile.
@router.post("/upload", status_code=status.HTTP_201_CREATED, response_model=ConceptRead)
def register_upload(
    session: SessionDep,
    settings: SettingsDep,
    fingerprint: FingerprintDep,
    principal: PrincipalDep,
    file: Annotated[UploadFile, File(description="JSON, safetensors, or a GGUF control vector (repeng / llama.cpp)")],
    name: Annotated[str, Form(pattern=NAME_PATTERN)],
    description: Annotated[Text, Form(max_length=2000)] = "",
    layer: Annotated[int | None, Form(ge=0, description="for files holding a single unlabelled vector")] = None,
    primary_layer: Annotated[int | None, Form(ge=0)] = None,
    format: Annotated[str | None, Form(description="json | safetensors | gguf; default: sniffed")] = None,
) -> ConceptRead:
    """Register the next version of a concept from an uploaded vector file."""
    # The whole request is already bounded by AUDITOR_MAX_UPLOAD_BYTES (auditor.api.limits).
    limit = settings.max_upload_bytes
    data = file.file.read(limit + 1)  # the spooled upload, read in this worker thread
    if len(data) > limit:
        raise InvalidInputError(f"file is larger than this deployment's limit of {limit:,} bytes")
    fmt = format or sniff_format(file.filename, data)
    if fmt not in FORMATS:
        raise InvalidInputError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    vector_set = parse_vectors(
        data, fmt, d_model=fingerprint.d_model, n_layers=fingerprint.n_layers, layer=layer, max_bytes=limit
    )
    _check_fingerprint(vector_set.metadata.get("model_fingerprint"), fingerprint)
    concept = _register(
        session,
        name=name,
        description=description,
        vector_set=vector_set,
        primary_layer=primary_layer,
        source=f"upload-{fmt}",
        fingerprint=fingerprint,
        principal=principal,
    )
    return concept_read(session, concept)


@router.post("/extract", status_code=status.HTTP_202_ACCEPTED, response_model=JobAccepted)
def extract(
    body: ExtractionCreate, request: Request, session: SessionDep, settings: SettingsDep, principal: PrincipalDep
):
    """Queue extraction of a concept vector from contrastive pairs. When the job is done, its
    result names the registered concept version, its primary layer and held-out separation."""
    check_extraction(body, settings)
    concept = {"name": body.name, "description": body.description, "pairs": [pair.model_dump() for pair in body.pairs]}
    concept_from_dict(concept, origin="pairs")  # every check the worker would make, before queueing
    payload = {
        "concept": concept,
        "method": body.method or settings.extraction_method,
        "pooling": body.pooling or settings.pooling,
        "activate": body.activate,
        "created_by": principal.name,
    }
    return dispatching.submit_job(request, session, principal, kind=JobKind.EXTRACT, task=TASK_EXTRACT, payload=payload)


@router.get("", response_model=list[ConceptRead])
def list_concepts(session: ReadSessionDep, active: bool | None = None, name: str | None = None) -> list[ConceptRead]:
    return [concept_read(session, c) for c in store.list_concepts(session, active=active, name=name)]


def _require(session, concept_id: int) -> Concept:
    concept = store.get_concept(session, concept_id=concept_id)
    if concept is None:
        raise ConceptNotFound(concept_id)
    return concept


@router.get("/{concept_id}", response_model=ConceptRead)
def get_concept(concept_id: RowId, session: ReadSessionDep) -> ConceptRead:
    return concept_read(session, _require(session, concept_id))


@router.post("/{concept_id}/activate", response_model=ConceptRead)
def activate(concept_id: RowId, session: SessionDep, principal: PrincipalDep) -> ConceptRead:
    concept = store.set_active(session, concept_id=_require(session, concept_id).id, active=True)
    _log(session, principal, "concept.activate", concept)
    session.commit()
    return concept_read(session, concept)


@router.post("/{concept_id}/deactivate", response_model=ConceptRead)
def deactivate(concept_id: RowId, session: SessionDep, principal: PrincipalDep) -> ConceptRead:
    concept = store.set_active(session, concept_id=_require(session, concept_id).id, active=False)
    _log(session, principal, "concept.deactivate", concept)
    session.commit()
    return concept_read(session, concept)


@router.post("/{concept_id}/retire", response_model=ConceptRead)
def retire(concept_id: RowId, session: SessionDep, principal: PrincipalDep) -> ConceptRead:
    concept = store.retire_concept(session, concept_id=_require(session, concept_id).id)
    _log(session, principal, "concept.retire", concept)
    session.commit()
    return concept_read(session, concept)


@router.get("/{concept_id}/export")
def export(
    concept_id: RowId,
    session: ReadSessionDep,
    format: Annotated[str, Query(pattern="^(json|safetensors|gguf)$")] = "json",
) -> Response:
    """The stored unit vectors, with provenance, as JSON, safetensors or a GGUF control vector."""
    concept = _require(session, concept_id)
    vectors = store.concept_vectors(session, concept_id=concept.id)
    metadata = {
        "concept": concept.name,
        "version": concept.version,
        "model_fingerprint": concept.model_fingerprint,
        "model_id": concept.model_id,
        "vector_hash": concept.vector_hash,
    }
    data = export_vectors(VectorSet(vectors, metadata), format, model_hint=concept.model_id)
    suffix = {"json": "json", "safetensors": "safetensors", "gguf": "gguf"}[format]
    return Response(
        data,
        media_type=MEDIA_TYPES[format],
        headers={"Content-Disposition": f'attachment; filename="{concept.name}-v{concept.version}.{suffix}"'},
    )
