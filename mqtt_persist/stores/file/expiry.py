"""The file store's listing and expiry: session infos, TTL updates and cleanup."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from mqtt_persist.stores._expiry import is_expired, session_info
from mqtt_persist.stores._files import file_base
from mqtt_persist.stores._leases import remove_expired
from mqtt_persist.stores.base import SessionInfo
from mqtt_persist.stores.file.core import FileStoreCore
from mqtt_persist.stores.file.index import Index
from mqtt_persist.stores.file.journal import (
    Damaged,
    read_and_parse,
    recorded_access,
)

logger = logging.getLogger(__name__)


class FileExpiry(FileStoreCore):
    """Listing, TTL and expired-session cleanup of a :class:`FileStore` (worker-thread jobs)."""

    def _expiry_on_disk(self, client_id: str) -> tuple[float, float | None] | None:
        """Last access and TTL of a session (open or not); None: no readable journal."""
        session = self._sessions.get(client_id)
        if session is not None:
            return session.last_access, session.ttl
        result = read_and_parse(self._paths(client_id).journal, False)
        if result is None or isinstance(result, Damaged):
            return None
        return recorded_access(result), result.ttl

    def _list_job(self) -> list[SessionInfo]:
        infos: list[SessionInfo] = []
        open_sessions = {file_base(cid): s for cid, s in self._sessions.items()}
        for name in sorted(os.listdir(self._directory)):
            if not name.endswith(".journal"):
                continue
            session = open_sessions.get(name.removesuffix(".journal"))
            if session is not None:
                if session.fd is not None:
                    infos.append(
                        _info(
                            session.client_id,
                            session.created_at,
                            session.last_access,
                            session.ttl,
                            session.index,
                        )
                    )
                continue
            path = os.path.join(self._directory, name)
            result = read_and_parse(path, True)
            if result is None:
                continue
            if isinstance(result, Damaged):
                logger.warning("skipping damaged session journal %s: %s", path, result.reason)
                continue
            assert result.index is not None
            infos.append(
                _info(
                    result.client_id,
                    result.created_at,
                    recorded_access(result),
                    result.ttl,
                    result.index,
                )
            )
        return infos

    def _update_ttl_job(self, client_id: str, ttl: float | None) -> None:
        session = self._session(client_id)
        now = self._clock()
        if session.fd is not None and session.expired(now):
            self._remove_journal(client_id)
            session = self._session(client_id)
        session.ttl = ttl
        session.append_metadata(now, ttl=True)
        session.last_access = now

    def _cleanup_job(self) -> int:
        now = self._clock()
        expired = [
            info.client_id
            for info in self._list_job()
            if info.expires_at is not None and now >= info.expires_at
        ]

        def remove(client_ids: Sequence[str]) -> int:
            removed = 0
            for client_id in client_ids:
                # Re-checked under the lease: the owner may have touched it since we listed it.
                expiry = self._expiry_on_disk(client_id)
                if expiry is not None and is_expired(*expiry, self._clock()):
                    removed += self._remove_journal(client_id)
            return removed

        return remove_expired(self._leases, expired, remove)

    # --- SessionStore ---------------------------------------------------------------------------


def _info(
    client_id: str, created_at: float, last_access: float, ttl: float | None, index: Index
) -> SessionInfo:
    return session_info(
        client_id,
        created_at=created_at,
        last_access=last_access,
        ttl=ttl,
        inflight=len(index.inflight),
        queued=index.q_live,
        set_aside=len(index.set_aside),
    )
