"""Exported networks of stored models, made on demand in the API process and kept in storage.

The first request for a model's network in a format loads its checkpoint and writes the file with
:func:`embedseg_service.core.model.export.export_model` (torch is imported then, never when the
API starts); the file is stored under the model's export folder (``models/<id>/``), so later
requests only send it. A model's weights never change, so a stored export stays valid; it is
removed with the model. Its bytes count in the model owner's stored bytes (``Model.export_bytes``). One
export runs at a time in a process.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

from fastapi import HTTPException
from sqlalchemy.orm import Session

from embedseg_service.api.quotas import check_owner_storage
from embedseg_service.core.model.export_format import ExportFormat, missing_exporter
from embedseg_service.records.orm import Model
from embedseg_service.records.settings import Settings
from embedseg_service.records.storage import Storage, model_export_key

_EXPORTING = threading.Lock()


def export_key(model_id: str, fmt: ExportFormat) -> str:
    """Storage key of the model's exported network in ``fmt``."""
    return model_export_key(model_id, f"network{fmt.suffix}")


def exported_network(storage: Storage, session: Session, settings: Settings, model: Model, fmt: ExportFormat) -> str:
    """The storage key of ``model``'s network exported as ``fmt``, made and stored first when there is none.
    Raises a 501 :class:`HTTPException` when this server cannot write ``fmt``, and a 413 one when the model's
    owner has no room for a file of the checkpoint's size (an export is about as large)."""
    key = export_key(model.id, fmt)
    if storage.exists(key):
        return key
    missing = missing_exporter(fmt)
    if missing:
        raise HTTPException(status_code=501, detail=f"{missing}; the torchscript format is available")
    with _EXPORTING:
        if not storage.exists(key):  # another request made it meanwhile
            check_owner_storage(session, settings, model.owner, model.size_bytes, "this export adds about")
            _export(storage, model, fmt, key)
            model.export_bytes = stored_export_bytes(storage, model.id)
            session.commit()
    return key


def stored_export_bytes(storage: Storage, model_id: str) -> int:
    """Bytes of the model's exports in storage (whichever process made them)."""
    return sum(storage.size(export_key(model_id, fmt)) for fmt in ExportFormat
               if storage.exists(export_key(model_id, fmt)))  # fmt: skip


def _export(storage: Storage, model: Model, fmt: ExportFormat, key: str) -> None:
    from embedseg_service.core.model.checkpoint import load_model
    from embedseg_service.core.model.export import export_model

    trained = load_model(storage.path_for(model.storage_key), device="cpu")
    with tempfile.TemporaryDirectory(prefix="embedseg-export-") as folder:
        local = export_model(trained, fmt, Path(folder) / f"network{fmt.suffix}")
        storage.put_file(key, local)
