"""A session store in Redis, for several gateway processes sharing one set of sessions.

Needs redis-py (``pip install mqtt-persist[redis]``; with ``hiredis`` installed redis-py parses
replies many times faster, which matters for large loads) and a Redis server 6.2 or newer
(tested with 7.0), standalone or primary/replica. Redis Cluster is not supported: a batch
touches a session's keys and the prefix-wide index keys in one script, which Cluster only
allows within one hash slot.

Key layout (``P`` is the prefix, ``ID`` the client id in UTF-8, ``SEQ`` a *sequence key*: the
sequence number plus 2**63 as 16 lowercase hex digits, so byte order is numeric order for every
int64 and range reads are exact; Redis scores are doubles, exact only to 2**53)::

    P:format              string  newest format version written under this prefix
    P:sessions            set     client ids of stored sessions (the index; also the marker
                                  that tells "expired by Redis" from "never existed")
    P:expiry              zset    client id -> expires_at (the store clock's seconds)
    P:lease:ID            string  the owner's JSON (host, pid, ...), PX lease_ttl
    P:s:ID:meta           hash    v (format), created_at, last_access, ttl (0 = never), last_seq
    P:s:ID:msg            hash    SEQ -> the message as added, without packet id and released
                                  flag (a MessageAdded in :mod:`~mqtt_persist.stores.serialization`)
    P:s:ID:queue          zset    SEQ of every queued message (no packet id), all scores 0:
                                  ZRANGEBYLEX reads the lowest ones without a scan
    P:s:ID:inflight       hash    SEQ -> packet id (decimal) of every in-flight message
    P:s:ID:released       set     SEQ of messages whose PUBREC arrived (QoS 2)
    P:s:ID:inbound        set     packet ids of open inbound QoS 2 flows
    P:s:ID:subs           hash    topic filter -> flags (qos | 4 if confirmed)
    P:s:ID:unsub          set     topic filters with an UNSUBSCRIBE pending
    P:quarantine:STAMP:ID:NAME    a damaged session's keys, moved aside (see below)

A message's stored bytes never change after it was added: a packet id, a release or a requeue
writes one small field, never rewrites the payload. Empty collections vanish (Redis deletes
them); ``meta`` exists exactly as long as the session does.

Atomicity
    Every call that writes runs ONE Lua script (EVALSHA): Redis runs a script alone and whole,
    so a client killed at any point leaves all of a batch or none of it. Lua rather than
    MULTI/EXEC because operations are conditional (``PacketIdAssigned`` only applies to a
    stored message, ``MessageAdded`` only when the sequence number is new), which a
    transaction could only express with WATCH and a read round trip per batch. Redis does not
    roll back a script that fails half way, so each script checks everything that could make
    a later command fail (key types, meta fields, the lease) before its first write; the
    Python side validates every operation before sending anything.

Durability
    ``apply`` returns once Redis has executed the script: the batch survives the *client*
    process (``durable`` is True). Whether it survives a crash of Redis itself is the
    server's configuration: use ``appendonly yes`` (``appendfsync always`` for no loss), and
    ``maxmemory-policy noeviction``: an evicting policy silently drops sessions (a warning is
    logged at :meth:`RedisStore.open` when the server says it evicts).

Expiry and last access
    ``meta.last_access`` is written by every ``apply``, ``load``, ``update_ttl`` and ``save``
    (one HSET inside the script that runs anyway, so it is always exact; there is no lazy
    write as in FileStore). Expiry is decided by the store's ``clock``: a session is expired
    once ``clock() >= last_access + ttl``; :meth:`~RedisStore.load` then removes it and raises
    :class:`~mqtt_persist.errors.SessionExpired`. On top of that every session key carries a
    Redis TTL (PEXPIRE, relative to Redis' own time) of ``ttl`` seconds, refreshed by the same
    accesses, so Redis reclaims an abandoned session by itself even when nobody ever calls
    :meth:`~RedisStore.cleanup_expired`. A session Redis expired has no ``meta`` but its id is
    still in ``P:sessions`` (which never expires): ``load`` reports that as ``SessionExpired``
    too and drops the marker. ``P:expiry`` indexes expiry times for ``cleanup_expired``, which
    removes expired sessions (and markers of ones Redis already reclaimed) that no lease holds.
    ``list_sessions`` only lists sessions whose data still exists.

Leases
    :meth:`~RedisStore.acquire` is ``SET P:lease:ID <owner> NX PX lease_ttl``; a background task
    renews every held lease each ``lease_ttl / 3`` with a compare-and-PEXPIRE, and
    :meth:`~RedisStore.release` deletes it only if it is still ours (compare-and-delete). The
    owner value is JSON naming host, boot id, PID namespace, pid and process start time. When
    the lease is held by a process on THIS host (same host name, boot id and PID namespace)
    that no longer runs (``os.kill(pid, 0)`` says ProcessLookupError, it is a zombie, or its
    pid now belongs to a process started later), ``acquire`` takes it over at once with an
    atomic compare-and-set; a holder elsewhere (or one we cannot check) blocks until its lease
    expires, at most ``lease_ttl`` after it stopped renewing. Every call that changes a session
    (``apply``, ``save``, ``update_ttl``, ``delete``, and ``load``, which moves last access and
    may remove an expired session) checks the lease inside its script and refuses
    (SessionLocked) when another owner holds it; a store that held a lease and lost it
    (renewal did not run for ``lease_ttl``, e.g. a stalled event loop) gets SessionLocked
    until it acquires again: nothing is written under a lease someone else may hold.
    ``exists``, ``list_sessions`` and ``read_queued`` read without a lease (``read_queued``
    still quarantines damage it finds, unless another owner holds the session).

Cost
    A script runs alone: Redis serves nobody else meanwhile. ``apply`` costs a few dozen
    microseconds of Redis time plus its operations; ``load(queued_limit=n)`` reads the
    in-flight messages and n queued ones whatever the queue's length. A full load
    (``queued_limit=None``) by the lease holder reads the queue in pages of 1000 (one short
    script each; nobody else can write meanwhile); without the lease it is ONE script, which
    for a huge queue keeps Redis busy for a while (about half a second per 100k messages).

Damage
    A value that does not decode, a meta field that is not a number, a key of the wrong type,
    or keys that contradict each other raise :class:`~mqtt_persist.errors.SessionCorrupt`
    naming the key; the session's keys are first RENAMEd to
    ``P:quarantine:<UTC timestamp>:ID:<name>`` and PERSISTed (never deleted, never expiring).
    A session whose ``meta.v`` is newer than :data:`FORMAT_VERSION`, or a prefix whose
    ``P:format`` is newer, raises :class:`~mqtt_persist.errors.UnsupportedFormatVersion` and is
    left in place: in a shared Redis a newer library version may be using it. An older
    ``meta.v`` is upgraded by :data:`_MIGRATIONS` the first time the session is used.

Credentials
    Nothing secret is stored (a session holds none). The URL may carry a password: it is never
    logged nor put in an error message (see :attr:`RedisStore.url`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import struct
import time
import typing
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mqtt_persist.errors import (
    InvalidInput,
    SessionCorrupt,
    SessionExpired,
    SessionLocked,
    StoreError,
    UnsupportedFormatVersion,
)
from mqtt_persist.session.state import (
    InboundCleared,
    InboundReceived,
    InboundReleased,
    MessageAdded,
    MessageReleased,
    MessageRemoved,
    MessageRequeued,
    Operation,
    PacketIdAssigned,
    SessionState,
    StoredMessage,
    StoredSubscription,
    SubscriptionRemoved,
    SubscriptionSet,
    UnsubscribeDone,
)
from mqtt_persist.stores.base import SessionInfo
from mqtt_persist.stores.serialization import DecodeError, EncodeError, decode_operation
from mqtt_persist.stores.serialization import encode_operation as _encode_operation


class RedisUnavailable(StoreError, ImportError):
    """redis-py is not installed; ``pip install mqtt-persist[redis]`` brings it."""


try:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript
    from redis.exceptions import RedisError, ResponseError
except ImportError as exc:  # the extra is optional: say how to get it, in both error families
    raise RedisUnavailable("RedisStore needs redis-py: pip install mqtt-persist[redis]") from exc

__all__ = ["FORMAT_VERSION", "RedisStore", "RedisUnavailable"]

logger = logging.getLogger(__name__)

#: The key layout this module writes (``P:format`` and every session's ``meta.v``).
FORMAT_VERSION = 1

#: Upgrades of one session, keyed by the version they upgrade FROM: each rewrites the session's
#: keys (atomically, e.g. in one script) and must set ``meta.v`` to a higher version. Empty
#: while version 1 is the only one; when version 2 arrives, add ``1: _migrate_1_to_2``.
_MIGRATIONS: dict[int, Callable[[Redis, _Keys], Awaitable[None]]] = {}

_SEQ_OFFSET = 1 << 63
_PID_MAX = 0xFFFF
# Session key names, in the order of KEYS[1..8] in every script.
_NAMES = ("meta", "msg", "queue", "inflight", "released", "inbound", "subs", "unsub")
_SUB_CONFIRMED = 4
# Lua's unpack() and one command's argument list stay far below their limits with this.
_CHUNK = 1000
# Queued messages per script when a lease holder loads everything: a few ms of Redis time.
_LOAD_PAGE = 1000


# --- Lua ----------------------------------------------------------------------------------------

# Shared by every session script. KEYS: the 8 session keys, lease, sessions index, expiry index.
# Numbers that must stay exact (sequence numbers, times) travel as strings: Lua numbers are
# doubles, and Lua's string comparison follows the server's locale, so neither is used on them.
_PRELUDE = r"""
local META, MSG, QUEUE, INFLIGHT = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local RELEASED, INBOUND, SUBS, UNSUB = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local LEASE, SESSIONS, EXPIRY = KEYS[9], KEYS[10], KEYS[11]
local TYPES = {'hash', 'hash', 'zset', 'hash', 'set', 'set', 'hash', 'set'}

local function number(s)
  local x = tonumber(s)
  if x == nil or x ~= x or x == math.huge or x == -math.huge then return nil end
  return x
end

local function is_int(s)
  return type(s) == 'string' and #s <= 20 and (s == '0' or string.match(s, '^%-?[1-9]%d*$') ~= nil)
end

-- a < b for canonical decimal integers, compared digit by digit.
local function seq_less(a, b)
  if a == b then return false end
  local an, bn = string.sub(a, 1, 1) == '-', string.sub(b, 1, 1) == '-'
  if an ~= bn then return an end
  if #a ~= #b then return (#a < #b) ~= an end
  for k = 1, #a do
    local x, y = string.byte(a, k), string.byte(b, k)
    if x ~= y then return (x < y) ~= an end
  end
  return false
end

-- nil when this caller may change the session, else the refusing reply. token: ours, or ''.
local function lease_refusal(token)
  local holder = redis.call('GET', LEASE)
  if holder then
    if holder ~= token then return {'locked', holder} end
  elseif token ~= '' then
    return {'lost'}
  end
  return nil
end

-- nil when key is missing or of the wanted type, else the refusing reply (status given).
local function wrong_type(status, key, want)
  local t = redis.call('TYPE', key)['ok']
  if t == 'none' or t == want then return nil end
  return {status, key, 'holds a ' .. t .. ', not a ' .. want}
end

local function index_damage()
  return wrong_type('badkey', SESSIONS, 'set') or wrong_type('badkey', EXPIRY, 'zset')
end

-- Run before the first write: Redis keeps the writes of a script that fails half way, so
-- nothing that could fail (WRONGTYPE above all) may be left for later.
-- mask: digits naming the session keys the script will touch ('12345678': all). A session
-- without meta gets every key checked: other keys without meta are damage, not a new session.
local function damage(mask)
  local has_meta = redis.call('EXISTS', META) == 1
  if not has_meta then mask = '12345678' end
  local any = false
  for k = 1, #mask do
    local i = string.byte(mask, k) - 48
    local t = redis.call('TYPE', KEYS[i])['ok']
    if t ~= 'none' then
      if t ~= TYPES[i] then
        return {'corrupt', KEYS[i], 'holds a ' .. t .. ', not a ' .. TYPES[i]}
      end
      any = true
    end
  end
  if any and not has_meta then
    return {'corrupt', META, 'is missing while the session has other keys'}
  end
  return nil
end

-- The session's meta (nil: no session), or nil and the refusing reply.
local function read_meta(format)
  if redis.call('EXISTS', META) == 0 then return nil, nil end
  local m = redis.call('HMGET', META, 'v', 'created_at', 'last_access', 'ttl', 'last_seq')
  local v = m[1]
  if not is_int(v) or string.sub(v, 1, 1) == '-' or #v > 9 then
    return nil, {'corrupt', META, 'field v is not a format version: ' .. tostring(v)}
  end
  if v ~= format then return nil, {'version', v} end
  local meta = {created_at_s = m[2], last_access = number(m[3]), ttl_s = m[4], ttl = number(m[4]),
                last_seq = m[5]}
  local bad
  if not number(m[2]) then
    bad = 'field created_at is not a number'
  elseif not meta.last_access then
    bad = 'field last_access is not a number'
  elseif not meta.ttl or meta.ttl < 0 then
    bad = 'field ttl is not a number >= 0'
  elseif not is_int(meta.last_seq) then
    bad = 'field last_seq is not an integer'
  end
  if bad then return nil, {'corrupt', META, bad} end
  return meta, nil
end

local function expired(meta, now)
  return meta.ttl > 0 and now >= meta.last_access + meta.ttl
end

local function remove_all(client_id)
  redis.call('DEL', META, MSG, QUEUE, INFLIGHT, RELEASED, INBOUND, SUBS, UNSUB)
  redis.call('SREM', SESSIONS, client_id)
  redis.call('ZREM', EXPIRY, client_id)
end

-- Every key gets the same Redis TTL, so Redis reclaims the session whole; P:expiry gets the
-- expiry in the store's clock, which is what exists/load/cleanup_expired decide by.
local function refresh_expiry(ttl, now, client_id)
  if ttl > 0 then
    local ms = string.format('%.0f', math.ceil(ttl * 1000))
    for i = 1, 8 do redis.call('PEXPIRE', KEYS[i], ms) end
    redis.call('ZADD', EXPIRY, string.format('%.17g', now + ttl), client_id)
  end
end

local function hmget_all(key, fields)
  local out = {}
  for s = 1, #fields, 1000 do
    local part = redis.call('HMGET', key, unpack(fields, s, math.min(s + 999, #fields)))
    for k = 1, #part do out[#out + 1] = part[k] end
  end
  return out
end

-- (SEQ, value) pairs as ONE string, each pair headed by both lengths (2 and 4 bytes, big
-- endian): a client parses every reply element on its own, which costs it far more than this.
-- seqs and values are parallel arrays; a missing value (false) gives nil and its index.
local function pack_pairs(seqs, values)
  local parts = {}
  for k = 1, #seqs do
    local v = values[k]
    if not v then return nil, k end
    parts[#parts + 1] = struct.pack('>I2I4', #seqs[k], #v)
    parts[#parts + 1] = seqs[k]
    parts[#parts + 1] = v
  end
  return table.concat(parts), nil
end

local function bulk(command, key, args)
  for s = 1, #args, 1000 do
    redis.call(command, key, unpack(args, s, math.min(s + 999, #args)))
  end
end

-- Everything a writing script checks before its first write: the lease, the types of the keys
-- in mask, meta, and the index keys it will write (SESSIONS when it creates the session,
-- EXPIRY when the session has a TTL). Returns meta (nil: no session) or nil and the refusal.
local function checked(token, format, mask)
  local refusal = lease_refusal(token)
  if refusal then return nil, refusal end
  refusal = damage(mask)
  if refusal then return nil, refusal end
  local meta
  meta, refusal = read_meta(format)
  if refusal then return nil, refusal end
  if not meta then
    refusal = wrong_type('badkey', SESSIONS, 'set') or wrong_type('badkey', EXPIRY, 'zset')
  elseif meta.ttl > 0 then
    refusal = wrong_type('badkey', EXPIRY, 'zset')
  end
  return meta, refusal
end
"""

# ARGV: token, now, format, client id, highest added seq ('' if none), the mask of session keys
# the operations touch, the operations (see _encode_ops).
_APPLY = (
    _PRELUDE
    + r"""
local token, now_s, format, client_id, top = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local meta, refusal = checked(token, format, ARGV[6])
if refusal then return refusal end
if meta then
  redis.call('HSET', META, 'last_access', now_s)
else
  redis.call('HSET', META, 'v', format, 'created_at', now_s, 'last_access', now_s, 'ttl', '0',
             'last_seq', '0')
  redis.call('SADD', SESSIONS, client_id)
  meta = {ttl = 0, last_seq = '0'}
end
-- The operations arrive as ONE argument, every field headed by its 4-byte length: one argument
-- per field would cost the client more to send than the whole script costs Redis.
local blob, pos, size = ARGV[7], 1, #ARGV[7]
local function field()
  local length = struct.unpack('>I4', blob, pos)
  local value = string.sub(blob, pos + 4, pos + 3 + length)
  pos = pos + 4 + length
  return value
end
while pos <= size do
  local op = field()
  if op == 'A' then
    local sk = field()
    local value = field()
    local pid = field()
    local released = field()
    if redis.call('HSETNX', MSG, sk, value) == 1 then
      if pid == '' then
        redis.call('ZADD', QUEUE, 0, sk)
      else
        redis.call('HSET', INFLIGHT, sk, pid)
      end
      if released == '1' then redis.call('SADD', RELEASED, sk) end
    end
  elseif op == 'P' then
    local sk = field()
    local pid = field()
    if redis.call('HEXISTS', MSG, sk) == 1 then
      redis.call('HSET', INFLIGHT, sk, pid)
      redis.call('ZREM', QUEUE, sk)
    end
  elseif op == 'L' then
    local sk = field()
    if redis.call('HEXISTS', MSG, sk) == 1 then redis.call('SADD', RELEASED, sk) end
  elseif op == 'Q' then
    local sk = field()
    if redis.call('HEXISTS', MSG, sk) == 1 then
      redis.call('HDEL', INFLIGHT, sk)
      redis.call('SREM', RELEASED, sk)
      redis.call('ZADD', QUEUE, 0, sk)
    end
  elseif op == 'R' then
    local sk = field()
    if redis.call('HDEL', MSG, sk) == 1 then
      redis.call('HDEL', INFLIGHT, sk)
      redis.call('SREM', RELEASED, sk)
      redis.call('ZREM', QUEUE, sk)
    end
  elseif op == 'I' then
    redis.call('SADD', INBOUND, field())
  elseif op == 'i' then
    redis.call('SREM', INBOUND, field())
  elseif op == 'C' then
    redis.call('DEL', INBOUND)
  elseif op == 'S' then
    local topic_filter = field()
    redis.call('HSET', SUBS, topic_filter, field())
    redis.call('SREM', UNSUB, topic_filter)
  elseif op == 'U' then
    local topic_filter = field()
    redis.call('HDEL', SUBS, topic_filter)
    if field() == '1' then redis.call('SADD', UNSUB, topic_filter) end
  else -- 'D'
    redis.call('SREM', UNSUB, field())
  end
end
if top ~= '' and seq_less(meta.last_seq, top) then redis.call('HSET', META, 'last_seq', top) end
refresh_expiry(meta.ttl, number(now_s), client_id)
return {'ok'}
"""
)

# ARGV: token, now, format, client id. An empty batch: only an access.
_TOUCH = (
    _PRELUDE
    + r"""
local meta, refusal = checked(ARGV[1], ARGV[3], '1')
if refusal then return refusal end
if meta then
  redis.call('HSET', META, 'last_access', ARGV[2])
  refresh_expiry(meta.ttl, number(ARGV[2]), ARGV[4])
end
return {'ok'}
"""
)

# ARGV: token, now, format, client id, queued limit (-1: all).
_LOAD = (
    _PRELUDE
    + r"""
local now_s, client_id = ARGV[2], ARGV[4]
local refusal = lease_refusal(ARGV[1])
if refusal then return refusal end
refusal = damage('12345678') or index_damage()
if refusal then return refusal end
if redis.call('EXISTS', META) == 0 then
  -- Still indexed but without data: Redis expired it (every key carries the session's TTL).
  if redis.call('SREM', SESSIONS, client_id) == 1 then
    redis.call('ZREM', EXPIRY, client_id)
    return {'gone'}
  end
  return {'none'}
end
local meta
meta, refusal = read_meta(ARGV[3])
if refusal then return refusal end
local now = number(now_s)
if expired(meta, now) then
  remove_all(client_id)
  return {'expired'}
end
redis.call('HSET', META, 'last_access', now_s)
refresh_expiry(meta.ttl, now, client_id)
local inflight = redis.call('HGETALL', INFLIGHT)
local seqs, values = {}, {}
if ARGV[5] == '-1' then
  local all = redis.call('HGETALL', MSG)
  for k = 1, #all, 2 do
    seqs[#seqs + 1] = all[k]
    values[#values + 1] = all[k + 1]
  end
else
  -- Every in-flight message, then the lowest queued ones.
  for k = 1, #inflight, 2 do seqs[#seqs + 1] = inflight[k] end
  local queued = redis.call('ZRANGEBYLEX', QUEUE, '-', '+', 'LIMIT', 0, ARGV[5])
  for k = 1, #queued do seqs[#seqs + 1] = queued[k] end
  values = hmget_all(MSG, seqs)
end
local packed, missing = pack_pairs(seqs, values)
if not packed then
  local lister = QUEUE
  if 2 * missing <= #inflight then lister = INFLIGHT end
  return {'corrupt', lister, 'lists ' .. seqs[missing] .. ', which ' .. MSG .. ' does not hold'}
end
return {'ok', {meta.created_at_s, now_s, meta.ttl_s, meta.last_seq}, inflight, packed,
        redis.call('ZCARD', QUEUE), redis.call('HLEN', MSG), redis.call('SMEMBERS', RELEASED),
        redis.call('SMEMBERS', INBOUND), redis.call('HGETALL', SUBS), redis.call('SMEMBERS', UNSUB)}
"""
)

# ARGV: first member ('-' or '(' .. SEQ), limit. Reads only.
_READ_QUEUED = (
    _PRELUDE
    + r"""
for _, i in ipairs({2, 3, 5}) do
  local refusal = wrong_type('corrupt', KEYS[i], TYPES[i])
  if refusal then return refusal end
end
local seqs = redis.call('ZRANGEBYLEX', QUEUE, ARGV[1], '+', 'LIMIT', 0, ARGV[2])
-- One '0'/'1' per message in one string: every reply element costs the client parsing time.
local released = {}
for s = 1, #seqs, 1000 do
  local part = redis.call('SMISMEMBER', RELEASED, unpack(seqs, s, math.min(s + 999, #seqs)))
  for k = 1, #part do released[#released + 1] = part[k] == 1 and '1' or '0' end
end
local packed, missing = pack_pairs(seqs, hmget_all(MSG, seqs))
if not packed then
  return {'corrupt', QUEUE, 'lists ' .. seqs[missing] .. ', which ' .. MSG .. ' does not hold'}
end
return {'ok', packed, table.concat(released)}
"""
)

# ARGV: token, now, format, client id, last_seq, then counted sections: messages (SEQ, value,
# packet id or '', released '1'/'0'), inbound packet ids, subscriptions (filter, flags), filters
# with an UNSUBSCRIBE pending.
_SAVE = (
    _PRELUDE
    + r"""
local token, now_s, format, client_id = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local meta, refusal = checked(token, format, '12345678')
if refusal then return refusal end
refusal = index_damage()
if refusal then return refusal end
local created, ttl_s, last = now_s, '0', ARGV[5]
if meta then
  created, ttl_s = meta.created_at_s, meta.ttl_s
  -- Sequence numbers only grow: a snapshot never hands out one the session already used.
  if seq_less(last, meta.last_seq) then last = meta.last_seq end
end
redis.call('DEL', META, MSG, QUEUE, INFLIGHT, RELEASED, INBOUND, SUBS, UNSUB)
redis.call('HSET', META, 'v', format, 'created_at', created, 'last_access', now_s, 'ttl', ttl_s,
           'last_seq', last)
redis.call('SADD', SESSIONS, client_id)
local i = 6
local msgs, queue, inflight, released = {}, {}, {}, {}
local n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  local sk = ARGV[i]
  msgs[#msgs + 1] = sk; msgs[#msgs + 1] = ARGV[i + 1]
  if ARGV[i + 2] == '' then
    queue[#queue + 1] = 0; queue[#queue + 1] = sk
  else
    inflight[#inflight + 1] = sk; inflight[#inflight + 1] = ARGV[i + 2]
  end
  if ARGV[i + 3] == '1' then released[#released + 1] = sk end
  i = i + 4
end
bulk('HSET', MSG, msgs); bulk('ZADD', QUEUE, queue); bulk('HSET', INFLIGHT, inflight)
bulk('SADD', RELEASED, released)
local sections = {{'SADD', INBOUND, 1}, {'HSET', SUBS, 2}, {'SADD', UNSUB, 1}}
for _, section in ipairs(sections) do
  n = tonumber(ARGV[i]) * section[3]; i = i + 1
  local args = {}
  for k = 1, n do args[k] = ARGV[i + k - 1] end
  i = i + n
  bulk(section[1], section[2], args)
end
refresh_expiry(number(ttl_s), number(now_s), client_id)
return {'ok'}
"""
)

# ARGV: token, now, format, client id, ttl seconds ('0': never).
_UPDATE_TTL = (
    _PRELUDE
    + r"""
local now_s, format, client_id, ttl_s = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local meta, refusal = checked(ARGV[1], format, '1')
if refusal then return refusal end
refusal = index_damage()
if refusal then return refusal end
local now = number(now_s)
if meta and expired(meta, now) then
  remove_all(client_id)
  meta = nil
end
if meta then
  redis.call('HSET', META, 'ttl', ttl_s, 'last_access', now_s)
else
  redis.call('HSET', META, 'v', format, 'created_at', now_s, 'last_access', now_s, 'ttl', ttl_s,
             'last_seq', '0')
  redis.call('SADD', SESSIONS, client_id)
end
local ttl = number(ttl_s)
if ttl > 0 then
  refresh_expiry(ttl, now, client_id)
else
  for k = 1, 8 do redis.call('PERSIST', KEYS[k]) end
  redis.call('ZREM', EXPIRY, client_id)
end
return {'ok'}
"""
)

# ARGV: token, client id.
_DELETE = (
    _PRELUDE
    + r"""
local refusal = lease_refusal(ARGV[1])
if refusal then return refusal end
refusal = index_damage()
if refusal then return refusal end
remove_all(ARGV[2])
return {'ok'}
"""
)

# ARGV: now, client id, format. 1 when the session was expired (by the clock, or already by
# Redis) and is now gone; 0 when it is held by a lease, was touched since, or is damaged (load
# reports damage, and quarantines it; cleanup never deletes what it cannot read).
_CLEANUP_ONE = (
    _PRELUDE
    + r"""
local client_id = ARGV[2]
if redis.call('EXISTS', LEASE) == 1 then return 0 end
if damage('12345678') or index_damage() then return 0 end
if redis.call('EXISTS', META) == 0 then
  return (redis.call('SREM', SESSIONS, client_id) + redis.call('ZREM', EXPIRY, client_id) > 0)
         and 1 or 0
end
local meta, refusal = read_meta(ARGV[3])
if refusal then return 0 end
if expired(meta, number(ARGV[1])) then
  remove_all(client_id)
  return 1
end
if meta.ttl == 0 then redis.call('ZREM', EXPIRY, client_id) end
return 0
"""
)

# KEYS: the 11 session script keys, then the 8 quarantine targets. ARGV: token, client id.
_QUARANTINE = (
    _PRELUDE
    + r"""
local holder = redis.call('GET', LEASE)
if holder and holder ~= ARGV[1] then return {'locked', holder} end
for i = 12, 19 do
  if redis.call('EXISTS', KEYS[i]) == 1 then return {'taken'} end
end
for i = 1, 8 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('RENAME', KEYS[i], KEYS[i + 11])
    -- RENAME keeps the source's TTL: quarantined data must never expire.
    redis.call('PERSIST', KEYS[i + 11])
  end
end
if not index_damage() then
  redis.call('SREM', SESSIONS, ARGV[2])
  redis.call('ZREM', EXPIRY, ARGV[2])
end
return {'ok'}
"""
)

# KEYS: lease. ARGV: expected holder, new holder, ttl ms.
_LEASE_TAKEOVER = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

# KEYS: lease. ARGV: our token, ttl ms.
_LEASE_RENEW = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: lease. ARGV: our token.
_LEASE_RELEASE = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: P:format. ARGV: our version. Returns the version found (ours when there was none); an
# older prefix is raised to ours (its sessions migrate one by one as they are used).
_FORMAT = r"""
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1])
  return ARGV[1]
end
if string.match(v, '^%d+$') and #v < 10 and tonumber(v) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return v
"""


# --- keys and values ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Keys:
    """The Redis keys of one session (and what a migration in :data:`_MIGRATIONS` receives)."""

    meta: bytes
    msg: bytes
    queue: bytes
    inflight: bytes
    released: bytes
    inbound: bytes
    subs: bytes
    unsub: bytes
    lease: bytes
    sessions: bytes
    expiry: bytes

    @property
    def session(self) -> tuple[bytes, ...]:
        """The eight keys holding the session's data, in script order."""
        return (
            self.meta,
            self.msg,
            self.queue,
            self.inflight,
            self.released,
            self.inbound,
            self.subs,
            self.unsub,
        )

    @property
    def script(self) -> tuple[bytes, ...]:
        """KEYS of every session script."""
        return (*self.session, self.lease, self.sessions, self.expiry)


class _Damage(Exception):
    """Stored data that cannot be read: which key, and why."""

    def __init__(self, key: bytes, reason: str) -> None:
        super().__init__(reason)
        self.key = key
        self.reason = reason


def _text(key: bytes) -> str:
    return key.decode("utf-8", "backslashreplace")


def _id_bytes(client_id: str) -> bytes:
    # surrogatepass: any str the client accepts as an id maps to distinct key bytes.
    return client_id.encode("utf-8", "surrogatepass")


def _seq_key(seq: int) -> bytes:
    if type(seq) is not int or not -_SEQ_OFFSET <= seq < _SEQ_OFFSET:
        raise EncodeError(f"sequence number {seq!r} is not an int64")
    return b"%016x" % (seq + _SEQ_OFFSET)


def _parse_seq_key(raw: object, key: bytes) -> int:
    if not isinstance(raw, bytes) or len(raw) != 16:
        raise _Damage(key, f"{raw!r} is not a sequence key")
    try:
        return int(raw, 16) - _SEQ_OFFSET
    except ValueError:
        raise _Damage(key, f"{raw!r} is not a sequence key") from None


def _parse_int(raw: object, key: bytes, what: str, low: int, high: int) -> int:
    try:
        if not isinstance(raw, bytes) or not raw.lstrip(b"-").isdigit():
            raise ValueError
        value = int(raw)
    except ValueError:
        raise _Damage(key, f"{what} {raw!r} is not an integer") from None
    if not low <= value <= high:
        raise _Damage(key, f"{what} {value} is out of range")
    return value


def _parse_float(raw: object, key: bytes, what: str) -> float:
    try:
        if not isinstance(raw, bytes):
            raise ValueError
        value = float(raw)
    except ValueError:
        raise _Damage(key, f"field {what} {raw!r} is not a number") from None
    if not math.isfinite(value):
        raise _Damage(key, f"field {what} {raw!r} is not a finite number")
    return value


def _parse_text(raw: object, key: bytes) -> str:
    if not isinstance(raw, bytes):
        raise _Damage(key, f"{raw!r} is not text")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise _Damage(key, f"{raw!r} is not UTF-8") from None


def _pid(packet_id: object) -> bytes:
    if type(packet_id) is not int or not 0 <= packet_id <= _PID_MAX:
        raise EncodeError(f"packet id {packet_id!r} out of range")
    return b"%d" % packet_id


def _filter(topic_filter: object) -> bytes:
    if not isinstance(topic_filter, str):
        raise EncodeError(f"topic filter {topic_filter!r} is not a str")
    try:
        return topic_filter.encode()
    except UnicodeEncodeError as exc:
        raise EncodeError(f"topic filter {topic_filter!r} is not valid Unicode") from exc


def _message_args(message: StoredMessage) -> list[bytes]:
    """SEQ, stored value, packet id (or b''), released flag: one message as scripts take it."""
    if message.packet_id is None and not message.released:
        value = _encode_operation(MessageAdded(message))
        packet_id = b""
    else:
        # The stored value never carries the mutable part; it lives in inflight/released.
        base = StoredMessage(
            message.seq, message.topic, message.payload, message.qos, message.retain
        )
        value = _encode_operation(MessageAdded(base))
        packet_id = b"" if message.packet_id is None else _pid(message.packet_id)
    return [_seq_key(message.seq), value, packet_id, b"1" if message.released else b"0"]


def _encode_ops(ops: Sequence[Operation]) -> tuple[bytes, bytes, bytes]:
    """The highest added sequence number (b'' if none), the mask of session keys the batch
    touches (digits, KEYS order) and the operations as the script reads them: each a code
    and its fields, every one of them headed by its length (4 bytes, big endian).

    Everything is validated here, before anything is sent: the script must not fail half way.
    """
    args: list[bytes] = []
    top: int | None = None
    # Key types are checked only where the batch writes: each check is a Redis call.
    messages = inbound = subscriptions = False
    for op in ops:
        kind = type(op)
        if kind is MessageAdded:
            message = typing.cast(MessageAdded, op).message
            args.append(b"A")
            args += _message_args(message)
            if top is None or message.seq > top:
                top = message.seq
            messages = True
        elif kind is PacketIdAssigned:
            assigned = typing.cast(PacketIdAssigned, op)
            args += (b"P", _seq_key(assigned.seq), _pid(assigned.packet_id))
            messages = True
        elif kind is MessageReleased:
            args += (b"L", _seq_key(typing.cast(MessageReleased, op).seq))
            messages = True
        elif kind is MessageRequeued:
            args += (b"Q", _seq_key(typing.cast(MessageRequeued, op).seq))
            messages = True
        elif kind is MessageRemoved:
            args += (b"R", _seq_key(typing.cast(MessageRemoved, op).seq))
            messages = True
        elif kind is InboundReceived:
            args += (b"I", _pid(typing.cast(InboundReceived, op).packet_id))
            inbound = True
        elif kind is InboundReleased:
            args += (b"i", _pid(typing.cast(InboundReleased, op).packet_id))
            inbound = True
        elif kind is InboundCleared:
            args.append(b"C")
            inbound = True
        elif kind is SubscriptionSet:
            sub = typing.cast(SubscriptionSet, op)
            args += (b"S", _filter(sub.topic_filter), _sub_flags(sub.qos, sub.confirmed))
            subscriptions = True
        elif kind is SubscriptionRemoved:
            removed = typing.cast(SubscriptionRemoved, op)
            pending = b"1" if removed.unsubscribe_pending else b"0"
            args += (b"U", _filter(removed.topic_filter), pending)
            subscriptions = True
        elif kind is UnsubscribeDone:
            args += (b"D", _filter(typing.cast(UnsubscribeDone, op).topic_filter))
            subscriptions = True
        else:
            raise TypeError(f"not a session operation: {op!r}")
    mask = b"1"
    if messages:
        mask += b"2345"
    if inbound:
        mask += b"6"
    if subscriptions:
        mask += b"78"
    pack = _U32.pack
    blob = b"".join([pack(len(field)) + field for field in args])
    return (b"" if top is None else b"%d" % top), mask, blob


def _sub_flags(qos: object, confirmed: bool) -> bytes:
    if type(qos) is not int or not 0 <= qos <= 2:
        raise EncodeError(f"subscription QoS {qos!r} out of range")
    return b"%d" % (qos | (_SUB_CONFIRMED if confirmed else 0))


_PAIR_HEAD = struct.Struct(">HI")
_U32 = struct.Struct(">I")


def _unpack_pairs(packed: bytes) -> list[tuple[bytes, bytes]]:
    """The (SEQ, value) pairs a script packed into one string (see ``pack_pairs``)."""
    pairs = []
    offset, end = 0, len(packed)
    head = _PAIR_HEAD.unpack_from
    try:
        while offset < end:
            seq_length, value_length = head(packed, offset)
            start = offset + 6
            value_start = start + seq_length
            offset = value_start + value_length
            pairs.append((packed[start:value_start], packed[value_start:offset]))
    except struct.error as exc:
        raise StoreError(f"malformed reply from the store's script: {exc}") from None
    if offset != end:
        raise StoreError("malformed reply from the store's script: truncated")
    return pairs


def _decode_message(
    keys: _Keys,
    where: bytes,
    seq_raw: object,
    value: object,
    packet_id: int | None,
    released: bool,
) -> StoredMessage:
    """One stored message; ``where`` is the key that listed ``seq_raw``."""
    seq = _parse_seq_key(seq_raw, where)
    if not isinstance(value, bytes):
        raise _Damage(where, f"{seq_raw!r} has no message in {_text(keys.msg)}")
    try:
        op = decode_operation(value)
    except DecodeError as exc:
        raise _Damage(keys.msg, f"field {_text(typing.cast(bytes, seq_raw))}: {exc}") from None
    if type(op) is not MessageAdded:
        raise _Damage(keys.msg, f"field {seq_raw!r} holds {type(op).__name__}, not a message")
    m = op.message
    if m.seq != seq or m.packet_id is not None or m.released:
        raise _Damage(keys.msg, f"field {seq_raw!r} holds a different message: {m!r}")
    if packet_id is None and not released:
        return m
    return StoredMessage(m.seq, m.topic, m.payload, m.qos, m.retain, packet_id, released)


def _describe_client(client: Redis) -> str:
    """Where a given client connects, built from its address only (never its credentials)."""
    kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


def _redact(url: str) -> str:
    """The URL without its password (``redis://user:***@host``), for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None:
            host += f":{parts.port}"
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "<unparseable redis URL>"


# --- lease owners -------------------------------------------------------------------------------


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _process_facts(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks after boot) of a process, from /proc (Linux)."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text:
        return None
    try:
        # The command name (field 2) may contain spaces and parentheses: split after its end.
        fields = text[text.rindex(")") + 2 :].split()
        return fields[0], int(fields[19])
    except (ValueError, IndexError):
        return None


def _identity() -> dict[str, Any]:
    """What makes a pid meaningful: host, boot and PID namespace, plus the process itself."""
    pid = os.getpid()
    identity: dict[str, Any] = {"host": socket.gethostname(), "pid": pid}
    boot = _read_text("/proc/sys/kernel/random/boot_id")
    if boot:
        identity["boot"] = boot
    with contextlib.suppress(OSError):
        identity["pidns"] = os.readlink("/proc/self/ns/pid")
    facts = _process_facts(pid)
    if facts is not None:
        identity["start"] = facts[1]
    return identity


def _parse_owner(raw: bytes) -> dict[str, Any] | None:
    try:
        owner = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return owner if isinstance(owner, dict) else None


def _describe_owner(raw: bytes) -> str:
    owner = _parse_owner(raw)
    if owner is None:
        return f"an unknown owner ({raw[:80]!r})"
    text = f"pid {owner.get('pid')} on host {owner.get('host')!r}"
    if owner.get("since") is not None:
        with contextlib.suppress(TypeError, ValueError, OverflowError, OSError):
            since = datetime.fromtimestamp(float(owner["since"]), UTC)
            text += f" since {since:%Y-%m-%d %H:%M:%S} UTC"
    return text


def _owner_is_dead(raw: bytes) -> bool:
    """True only when the holder provably no longer runs: it is a process of this very host.

    Host name, boot id and PID namespace must all match ours (two machines may share a host
    name; a container may share the host's); anything we cannot check counts as alive.
    """
    owner = _parse_owner(raw)
    if owner is None:
        return False
    me = _identity()
    if any(owner.get(field) != me.get(field) for field in ("host", "boot", "pidns")):
        return False
    pid = owner.get("pid")
    if type(pid) is not int or pid <= 0:
        return False
    recorded_start = owner.get("start")
    if pid == me["pid"]:
        # This process (another store in it, alive) or an earlier one that had our pid.
        return recorded_start is not None and recorded_start != me.get("start")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, owned by another user
    facts = _process_facts(pid)
    if facts is None:
        return False
    state, start = facts
    if state in ("Z", "X"):
        return True  # killed, not yet reaped by its parent
    # The pid now belongs to a process started after the holder: the holder is gone.
    return type(recorded_start) is int and recorded_start != start


# --- the store ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Lease:
    token: bytes
    #: The lease expired or was taken over while we held it; writes are refused until release.
    lost: bool = False


@dataclass(slots=True)
class _Scripts:
    apply: AsyncScript
    touch: AsyncScript
    load: AsyncScript
    read_queued: AsyncScript
    save: AsyncScript
    update_ttl: AsyncScript
    delete: AsyncScript
    cleanup_one: AsyncScript
    quarantine: AsyncScript
    lease_takeover: AsyncScript
    lease_renew: AsyncScript
    lease_release: AsyncScript
    format: AsyncScript

    @classmethod
    def register(cls, client: Redis) -> _Scripts:
        r = client.register_script
        return cls(
            r(_APPLY),
            r(_TOUCH),
            r(_LOAD),
            r(_READ_QUEUED),
            r(_SAVE),
            r(_UPDATE_TTL),
            r(_DELETE),
            r(_CLEANUP_ONE),
            r(_QUARANTINE),
            r(_LEASE_TAKEOVER),
            r(_LEASE_RENEW),
            r(_LEASE_RELEASE),
            r(_FORMAT),
        )


class RedisStore:
    """A :class:`~mqtt_persist.stores.base.SessionStore` in Redis, shared between processes.

    See the module documentation for the key layout and the guarantees. ``url`` is a redis-py
    URL (``redis://[:password@]host:port/db``, ``rediss://`` for TLS, ``unix://``); ``client``
    instead reuses a ``redis.asyncio.Redis`` made with ``decode_responses=False`` (the store
    then never closes it). ``prefix`` namespaces every key, so several deployments can share
    one database (no prefix may be a prefix of another followed by ``:``). ``clock`` returns
    Unix time in seconds and drives last access and expiry. ``lease_ttl`` (seconds) is how long
    a lease outlives an owner that stopped renewing it; leases are renewed every third of it.
    """

    #: A committed batch survives the client process (and Redis restarts, given AOF).
    durable = True

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "mqtt_persist",
        clock: Callable[[], float] = time.time,
        lease_ttl: float = 15.0,
        client: Redis | None = None,
    ) -> None:
        """Configure the store; nothing connects before :meth:`open` (or the first call)."""
        if not prefix:
            raise InvalidInput("the key prefix must not be empty")
        if not (isinstance(lease_ttl, int | float) and math.isfinite(lease_ttl) and lease_ttl > 0):
            raise InvalidInput(f"lease_ttl must be a positive number of seconds, not {lease_ttl!r}")
        if client is not None and client.connection_pool.connection_kwargs.get("decode_responses"):
            raise InvalidInput("RedisStore needs a client made with decode_responses=False")
        self._url = url
        self._safe_url = _redact(url) if client is None else _describe_client(client)
        self._prefix = prefix
        self._key_prefix = _id_bytes(prefix)
        self._clock = clock
        self._lease_ttl = float(lease_ttl)
        self._lease_ms = max(1, math.ceil(self._lease_ttl * 1000))
        self._given_client = client
        self._client: Redis | None = None
        self._scripts: _Scripts | None = None
        self._store_id = uuid.uuid4().hex
        self._leases: dict[str, _Lease] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._open_lock = asyncio.Lock()
        self._renewal: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        """Shows the URL without its password."""
        return f"RedisStore({self._safe_url!r}, prefix={self._prefix!r})"

    @property
    def url(self) -> str:
        """The server's URL with any password replaced by ``***`` (safe to log)."""
        return self._safe_url

    @property
    def prefix(self) -> str:
        """The prefix of every key this store uses."""
        return self._prefix

    async def __aenter__(self) -> RedisStore:
        """``async with RedisStore(...) as store``: open on entry."""
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Close on exit (releases leases; the sessions stay)."""
        await self.close()

    # --- plumbing -------------------------------------------------------------------------------

    def _key(self, *parts: bytes) -> bytes:
        return b":".join((self._key_prefix, *parts))

    def session_keys(self, client_id: str) -> dict[str, bytes]:
        """The Redis keys of ``client_id``'s session by name (meta, msg, ..., lease)."""
        keys = self._keys(client_id)
        return {name: getattr(keys, name) for name in (*_NAMES, "lease")}

    def _keys(self, client_id: str) -> _Keys:
        ident = _id_bytes(client_id)
        base = self._key(b"s", ident)
        meta, msg, queue, inflight, released, inbound, subs, unsub = (
            base + b":" + name.encode() for name in _NAMES
        )
        return _Keys(
            meta,
            msg,
            queue,
            inflight,
            released,
            inbound,
            subs,
            unsub,
            lease=self._key(b"lease", ident),
            sessions=self._key(b"sessions"),
            expiry=self._key(b"expiry"),
        )

    def _lock_for(self, client_id: str) -> asyncio.Lock:
        # Calls for one session run in call order, as one client issues them (a batch after
        # the one it follows), even though the connection pool could reorder them.
        lock = self._locks.get(client_id)
        if lock is None:
            lock = self._locks[client_id] = asyncio.Lock()
        return lock

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Report Redis' failures as the store's (without the URL's password)."""
        try:
            yield
        except RedisError as exc:
            raise StoreError(f"redis at {self._safe_url} failed: {exc}") from exc

    async def _ready(self) -> tuple[Redis, _Scripts]:
        if self._client is None or self._scripts is None:
            await self.open()
        assert self._client is not None and self._scripts is not None
        return self._client, self._scripts

    async def _eval(self, script: AsyncScript, keys: Sequence[bytes], args: Sequence[Any]) -> Any:
        with self._errors():
            return await script(keys=keys, args=args)

    def _token(self, client_id: str) -> bytes:
        lease = self._leases.get(client_id)
        return b"" if lease is None else lease.token

    def _now(self) -> bytes:
        # repr() round-trips a float exactly; Lua's tonumber reads it back to the same double.
        return repr(float(self._clock())).encode()

    async def _session_call(
        self, client_id: str, pick: Callable[[_Scripts], AsyncScript], tail: Sequence[Any]
    ) -> list[Any]:
        """Run a session script; refusals become exceptions, older formats are migrated first."""
        client, scripts = await self._ready()
        keys = self._keys(client_id)
        migrated_from: set[bytes] = set()
        while True:
            args = [self._token(client_id), self._now(), FORMAT_VERSION, _id_bytes(client_id)]
            reply = await self._eval(pick(scripts), keys.script, [*args, *tail])
            if reply[0] != b"version":
                return await self._checked(client_id, keys, reply)
            version_raw = reply[1]
            version = int(version_raw)
            if version > FORMAT_VERSION:
                raise UnsupportedFormatVersion(
                    f"session {client_id!r} was written in format version {version}, newer "
                    f"than this library's {FORMAT_VERSION}; left in place",
                    location=_text(keys.meta),
                )
            migration = _MIGRATIONS.get(version)
            if migration is None or version_raw in migrated_from:
                reason = (
                    f"format version {version} is not one this library ever wrote"
                    if migration is None
                    else f"the migration from format version {version} did not advance it"
                )
                raise await self._quarantine(client_id, keys, keys.meta, reason)
            migrated_from.add(version_raw)
            with self._errors():
                await migration(client, keys)

    async def _checked(self, client_id: str, keys: _Keys, reply: list[Any]) -> list[Any]:
        status = reply[0]
        if status == b"locked":
            if (lease := self._leases.get(client_id)) is not None:
                lease.lost = True  # someone took it over: acquire may try again
            raise SessionLocked(
                f"session {client_id!r} is held by {_describe_owner(reply[1])} "
                f"(lease key {_text(keys.lease)})"
            )
        if status == b"lost":
            lease = self._leases.get(client_id)
            if lease is not None:
                lease.lost = True
            raise SessionLocked(
                f"this store's lease on session {client_id!r} expired (not renewed within "
                f"{self._lease_ttl:g} s); release and acquire it again"
            )
        if status == b"corrupt":
            raise await self._quarantine(client_id, keys, reply[1], _text(reply[2]))
        if status == b"badkey":
            raise SessionCorrupt(_text(reply[2]), location=_text(reply[1]))
        return reply

    async def _quarantine(
        self, client_id: str, keys: _Keys, key: bytes, reason: str
    ) -> SessionCorrupt:
        """Move the session's keys aside (RENAME + PERSIST); the error to raise, naming both."""
        _, scripts = await self._ready()
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ").encode()
        location = _text(key)
        for attempt in range(100):
            suffix = stamp if attempt == 0 else stamp + b"-%d" % attempt
            base = self._key(b"quarantine", suffix, _id_bytes(client_id))
            targets = [base + b":" + name.encode() for name in _NAMES]
            try:
                reply = await self._eval(
                    scripts.quarantine,
                    [*keys.script, *targets],
                    [self._token(client_id), _id_bytes(client_id)],
                )
            except StoreError as exc:
                logger.error(
                    "damaged session %r (%s: %s) not moved aside: %s",
                    client_id,
                    location,
                    reason,
                    exc,
                )
                return SessionCorrupt(f"{reason}; moving it aside failed: {exc}", location=location)
            if reply[0] == b"taken":
                continue
            if reply[0] == b"locked":
                holder = _describe_owner(reply[1])
                return SessionCorrupt(
                    f"{reason}; not moved aside while {holder} holds the session",
                    location=location,
                )
            moved_to = _text(base) + ":*"
            logger.error(
                "damaged session %r (%s: %s) moved to %s", client_id, location, reason, moved_to
            )
            return SessionCorrupt(reason, location=location, quarantined_to=moved_to)
        return SessionCorrupt(f"{reason}; no free quarantine name", location=location)

    # --- leases ---------------------------------------------------------------------------------

    def _owner_value(self) -> bytes:
        owner = _identity()
        owner["store"] = self._store_id
        owner["since"] = round(time.time(), 3)
        return json.dumps(owner, sort_keys=True).encode()

    def _start_renewal(self) -> None:
        if self._renewal is None or self._renewal.done():
            self._renewal = asyncio.get_running_loop().create_task(
                self._renew_forever(), name=f"RedisStore lease renewal ({self._prefix})"
            )

    async def _stop_renewal(self) -> None:
        task, self._renewal = self._renewal, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _renew_forever(self) -> None:
        interval = self._lease_ttl / 3
        while True:
            await asyncio.sleep(interval)
            if self._client is None or self._scripts is None:
                continue
            for client_id, lease in list(self._leases.items()):
                if lease.lost:
                    continue
                key = self._keys(client_id).lease
                try:
                    renewed = await self._eval(
                        self._scripts.lease_renew, [key], [lease.token, self._lease_ms]
                    )
                except StoreError as exc:
                    # Try again next round: the lease survives until lease_ttl runs out.
                    logger.warning("could not renew the lease of session %r: %s", client_id, exc)
                    continue
                if not renewed and self._leases.get(client_id) is lease:
                    lease.lost = True
                    logger.error(
                        "lost the lease of session %r (it expired before renewal); writes to "
                        "it are refused until it is acquired again",
                        client_id,
                    )

    # --- SessionStore ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, check the prefix's format version. Idempotent; other methods call it.

        Raises :class:`~mqtt_persist.errors.UnsupportedFormatVersion` when a newer library
        version has written under this prefix.
        """
        async with self._open_lock:
            if self._client is not None:
                return
            client = self._given_client
            if client is None:
                client = Redis.from_url(self._url, decode_responses=False)
            scripts = _Scripts.register(client)
            try:
                await self._check_format(client, scripts)
            except BaseException:
                if self._given_client is None:
                    with contextlib.suppress(Exception):
                        await client.aclose()
                raise
            self._client, self._scripts = client, scripts
            await self._warn_if_evicting(client)

    async def _check_format(self, client: Redis, scripts: _Scripts) -> None:
        key = self._key(b"format")
        try:
            with self._errors():
                found = await scripts.format(keys=[key], args=[FORMAT_VERSION])
        except StoreError as exc:
            if isinstance(exc.__cause__, ResponseError) and "WRONGTYPE" in str(exc.__cause__):
                raise SessionCorrupt("not a string", location=_text(key)) from exc
            raise
        if not (isinstance(found, bytes) and found.isdigit() and len(found) < 10):
            raise SessionCorrupt(f"{found!r} is not a format version", location=_text(key))
        version = int(found)
        if version > FORMAT_VERSION:
            raise UnsupportedFormatVersion(
                f"keys under prefix {self._prefix!r} were written in format version {version}, "
                f"newer than this library's {FORMAT_VERSION}",
                location=_text(key),
            )
        if version < FORMAT_VERSION:
            logger.info(
                "prefix %r: format version %d raised to %d; sessions migrate as they are used",
                self._prefix,
                version,
                FORMAT_VERSION,
            )

    async def _warn_if_evicting(self, client: Redis) -> None:
        try:
            config: dict[Any, Any] = await client.config_get("maxmemory-policy")
        except RedisError:
            return  # CONFIG is often disabled on managed servers: nothing to check then
        policy = config.get(b"maxmemory-policy", config.get("maxmemory-policy"))
        if isinstance(policy, bytes):
            policy = policy.decode()
        if policy and policy != "noeviction":
            logger.warning(
                "redis maxmemory-policy is %r: Redis may evict session data under memory "
                "pressure; use noeviction",
                policy,
            )

    async def close(self) -> None:
        """Stop renewing, release every lease and disconnect; the sessions stay. Idempotent.

        A lease that cannot be released (Redis unreachable) is logged and left to expire within
        ``lease_ttl``.
        """
        await self._stop_renewal()
        client, scripts = self._client, self._scripts
        leases, self._leases = self._leases, {}
        if client is not None and scripts is not None:
            for client_id, lease in leases.items():
                try:
                    await self._eval(
                        scripts.lease_release, [self._keys(client_id).lease], [lease.token]
                    )
                except StoreError as exc:
                    logger.warning("could not release the lease of session %r: %s", client_id, exc)
        self._client = self._scripts = None
        if client is not None and self._given_client is None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    async def acquire(self, client_id: str) -> None:
        """Take the lease of ``client_id``'s session; renewed in the background until released.

        Raises :class:`~mqtt_persist.errors.SessionLocked`, naming the holder, when another
        owner holds it (unless that owner is a dead process on this host: then the lease is
        taken over), or when this store already holds it.
        """
        async with self._lock_for(client_id):
            held = self._leases.get(client_id)
            if held is not None and not held.lost:
                raise SessionLocked(f"session {client_id!r} is already acquired by this store")
            client, scripts = await self._ready()
            key = self._keys(client_id).lease
            token = self._owner_value()
            for _ in range(5):
                with self._errors():
                    if await client.set(key, token, nx=True, px=self._lease_ms):
                        break
                    holder = typing.cast(bytes | None, await client.get(key))
                if holder is None:
                    continue  # it expired just now: try again
                if held is not None and holder == held.token:
                    token = holder  # our lost lease is back in our name (renewal caught up)
                    break
                if not _owner_is_dead(holder):
                    raise SessionLocked(
                        f"session {client_id!r} is held by {_describe_owner(holder)} "
                        f"(lease key {_text(key)})"
                    )
                if await self._eval(scripts.lease_takeover, [key], [holder, token, self._lease_ms]):
                    logger.warning(
                        "took over the lease of session %r from %s, which no longer runs",
                        client_id,
                        _describe_owner(holder),
                    )
                    break
            else:
                raise SessionLocked(f"session {client_id!r}: its lease keeps changing hands")
            self._leases[client_id] = _Lease(token)
            self._start_renewal()

    async def release(self, client_id: str) -> None:
        """Give the lease back if this store still holds it (compare-and-delete). Idempotent."""
        async with self._lock_for(client_id):
            lease = self._leases.pop(client_id, None)
            if not self._leases:
                await self._stop_renewal()
            if lease is None or self._scripts is None:
                return
            await self._eval(
                self._scripts.lease_release, [self._keys(client_id).lease], [lease.token]
            )

    async def load(self, client_id: str, *, queued_limit: int | None = None) -> SessionState | None:
        """The stored session, or None; an access (moves last access and the Redis TTL).

        With ``queued_limit`` only the lowest that many queued messages are read (a range read,
        no scan); ``queued_not_loaded`` counts the rest. Raises
        :class:`~mqtt_persist.errors.SessionExpired` (removed),
        :class:`~mqtt_persist.errors.SessionCorrupt` (quarantined) and
        :class:`~mqtt_persist.errors.SessionLocked` (another owner holds the lease).
        """
        if queued_limit is not None and (type(queued_limit) is not int or queued_limit < 0):
            raise InvalidInput(f"queued_limit must be an int >= 0 or None, not {queued_limit!r}")
        async with self._lock_for(client_id):
            held = self._leases.get(client_id)
            # Under our lease nobody else writes the session, and our own writes wait for this
            # lock: a full load may then read the queue in pages, each a short script, rather
            # than in one script that keeps Redis from every other client while it runs.
            paged = queued_limit is None and held is not None and not held.lost
            limit = -1 if queued_limit is None else queued_limit
            if paged:
                limit = _LOAD_PAGE
            reply = await self._session_call(client_id, attrgetter("load"), [limit])
            status = reply[0]
            if status == b"none":
                return None
            if status in (b"expired", b"gone"):
                raise SessionExpired(f"session {client_id!r} expired and was removed")
            keys = self._keys(client_id)
            try:
                state = _build_state(
                    client_id, keys, reply, full=queued_limit is None and not paged
                )
            except _Damage as damage:
                raise await self._quarantine(client_id, keys, damage.key, damage.reason) from None
            if paged and state.queued_not_loaded:
                await self._load_rest(state)
            return state

    async def _load_rest(self, state: SessionState) -> None:
        """Add the queued messages a paged load left in the store (under our lease)."""
        messages = list(state.messages.values())
        after = max(m.seq for m in messages if m.packet_id is None)
        while page := await self.read_queued(state.client_id, after, _LOAD_PAGE):
            messages += page
            after = page[-1].seq
        messages.sort(key=attrgetter("seq"))
        state.messages = {m.seq: m for m in messages}
        state.queued_not_loaded = 0

    async def read_queued(self, client_id: str, after_seq: int, limit: int) -> list[StoredMessage]:
        """Queued messages with ``seq > after_seq``, ascending, at most ``limit`` (a range read).

        Only reads (no access, no lease check). An unknown session gives [].
        """
        if limit <= 0 or after_seq >= _SEQ_OFFSET - 1:
            return []
        start = b"-" if after_seq < -_SEQ_OFFSET else b"(" + _seq_key(after_seq)
        _, scripts = await self._ready()
        keys = self._keys(client_id)
        reply = await self._eval(scripts.read_queued, keys.script, [start, limit])
        try:
            if reply[0] == b"corrupt":
                raise _Damage(reply[1], _text(reply[2]))
            released = reply[2]
            return [
                _decode_message(keys, keys.queue, seq_raw, value, None, released[n] == 0x31)
                for n, (seq_raw, value) in enumerate(_unpack_pairs(reply[1]))
            ]
        except _Damage as damage:
            raise await self._quarantine(client_id, keys, damage.key, damage.reason) from None

    async def save(self, state: SessionState) -> None:
        """Replace the stored session with this snapshot, atomically (one script).

        Keeps created_at and the TTL; ``last_seq`` never decreases. Damaged stored data is
        quarantined first, then replaced. The snapshot replaces everything, so a state loaded
        with ``queued_limit`` must not be saved while messages were left in the store (they
        would be dropped).
        """
        client_id = state.client_id
        messages = list(state.messages.values())
        tail: list[Any] = []
        top = max([state.last_seq, *(m.seq for m in messages)])
        _seq_key(top)
        tail.append(b"%d" % top)
        tail.append(len(messages))
        for message in messages:
            tail += _message_args(message)
        inbound = sorted(state.inbound_qos2)
        tail.append(len(inbound))
        tail += [_pid(packet_id) for packet_id in inbound]
        subs = list(state.subscriptions.values())
        tail.append(len(subs))
        for sub in subs:
            tail += (_filter(sub.topic_filter), _sub_flags(sub.qos, sub.confirmed))
        pending = sorted(state.pending_unsubscribes)
        tail.append(len(pending))
        tail += [_filter(topic_filter) for topic_filter in pending]
        async with self._lock_for(client_id):
            try:
                await self._session_call(client_id, attrgetter("save"), tail)
            except SessionCorrupt as exc:
                if exc.quarantined_to is None:
                    raise
                # The damaged session was moved aside; the snapshot replaces it anyway.
                await self._session_call(client_id, attrgetter("save"), tail)

    async def apply(self, client_id: str, ops: Sequence[Operation]) -> None:
        """Apply a batch atomically: ONE script (one EVALSHA round trip) whatever its size.

        Creates the session if there is none. An empty batch only counts as an access. Expiry
        is not checked (the caller holds the session). Raises
        :class:`~mqtt_persist.errors.SessionLocked` when another owner holds the lease.
        """
        if not ops:
            async with self._lock_for(client_id):
                await self._session_call(client_id, attrgetter("touch"), ())
            return
        top, mask, blob = _encode_ops(ops)
        async with self._lock_for(client_id):
            await self._session_call(client_id, attrgetter("apply"), [top, mask, blob])

    async def delete(self, client_id: str) -> None:
        """Remove the session's keys (quarantined ones stay; an acquired lease stays held).

        Idempotent. Raises :class:`~mqtt_persist.errors.SessionLocked` when another owner holds
        the lease.
        """
        async with self._lock_for(client_id):
            _, scripts = await self._ready()
            keys = self._keys(client_id)
            reply = await self._eval(
                scripts.delete, keys.script, [self._token(client_id), _id_bytes(client_id)]
            )
            await self._checked(client_id, keys, reply)

    async def exists(self, client_id: str) -> bool:
        """True when a non-expired session is stored (reads only).

        Damaged data counts as existing: :meth:`load` reports (and quarantines) it.
        """
        client, _ = await self._ready()
        meta = self._keys(client_id).meta
        try:
            with self._errors():
                last_access, ttl = await client.hmget(meta, [b"last_access", b"ttl"])
        except StoreError as exc:
            if isinstance(exc.__cause__, ResponseError) and "WRONGTYPE" in str(exc.__cause__):
                return True
            raise
        if last_access is None and ttl is None:
            return False
        try:
            access = _parse_float(last_access, meta, "last_access")
            seconds = _parse_float(ttl, meta, "ttl")
        except _Damage:
            return True
        return not (seconds > 0 and self._clock() >= access + seconds)

    async def list_sessions(self) -> list[SessionInfo]:
        """Every stored session (expired ones included until removed), sorted by client id.

        Reads the ``P:sessions`` index, then each session's meta and counts in pipelines.
        Sessions Redis already expired and damaged ones are skipped (the latter logged).
        """
        client, _ = await self._ready()
        with self._errors():
            members = typing.cast(set[bytes], await client.smembers(self._key(b"sessions")))
        ids = sorted(member.decode("utf-8", "surrogatepass") for member in members)
        infos: list[SessionInfo] = []
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            with self._errors():
                async with client.pipeline(transaction=False) as pipe:
                    for client_id in chunk:
                        keys = self._keys(client_id)
                        pipe.hmget(keys.meta, [b"created_at", b"last_access", b"ttl"])
                        pipe.hlen(keys.inflight)
                        pipe.zcard(keys.queue)
                    results = await pipe.execute(raise_on_error=False)
            for n, client_id in enumerate(chunk):
                meta, inflight, queued = results[3 * n : 3 * n + 3]
                keys = self._keys(client_id)
                try:
                    if any(isinstance(r, Exception) for r in (meta, inflight, queued)):
                        raise _Damage(keys.meta, "a key of the wrong type")
                    if meta == [None, None, None]:
                        continue  # expired by Redis: only the index entry is left
                    created_at = _parse_float(meta[0], keys.meta, "created_at")
                    last_access = _parse_float(meta[1], keys.meta, "last_access")
                    ttl = _parse_float(meta[2], keys.meta, "ttl")
                except _Damage as damage:
                    logger.warning(
                        "skipping damaged session %r (%s: %s)",
                        client_id,
                        _text(damage.key),
                        damage.reason,
                    )
                    continue
                infos.append(
                    SessionInfo(
                        client_id=client_id,
                        created_at=created_at,
                        last_access=last_access,
                        expires_at=last_access + ttl if ttl > 0 else None,
                        inflight=int(inflight),
                        queued=int(queued),
                    )
                )
        return infos

    async def update_ttl(self, client_id: str, seconds: float | None) -> None:
        """Expire the session ``seconds`` after its last access (None or 0: never); an access.

        Sets (or, for never, removes) the Redis TTL of every key of the session. Creates an
        empty session when none is stored (an expired one counts as none), so the expiry is in
        force from now on even before the first operation is applied.
        """
        if seconds is None:
            seconds = 0.0
        if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds >= 0):
            raise InvalidInput(f"a session TTL must be None or seconds >= 0, not {seconds!r}")
        async with self._lock_for(client_id):
            await self._session_call(
                client_id, attrgetter("update_ttl"), [repr(float(seconds)).encode()]
            )

    async def cleanup_expired(self) -> int:
        """Remove every expired session no lease holds; returns how many were removed.

        Candidates come from the ``P:expiry`` index (a range read up to now); each is checked
        again and removed by one script, so a session touched meanwhile survives. Sessions
        Redis already reclaimed count too (their index entries are removed).
        """
        client, scripts = await self._ready()
        now = self._clock()
        with self._errors():
            due = typing.cast(
                list[bytes],
                await client.zrangebyscore(self._key(b"expiry"), "-inf", repr(float(now))),
            )
        removed = 0
        for member in due:
            client_id = member.decode("utf-8", "surrogatepass")
            async with self._lock_for(client_id):
                keys = self._keys(client_id)
                removed += await self._eval(
                    scripts.cleanup_one, keys.script, [repr(float(now)), member, FORMAT_VERSION]
                )
        return removed


def _build_state(client_id: str, keys: _Keys, reply: list[Any], *, full: bool) -> SessionState:
    """The state from the load script's reply; raises :class:`_Damage` for anything unreadable.

    ``full``: the reply holds every message (HGETALL), else the in-flight ones and the lowest
    queued ones, in that order.
    """
    (
        _,
        meta,
        inflight_flat,
        packed,
        queue_total,
        msg_total,
        released_raw,
        inbound_raw,
        subs_flat,
        unsub_raw,
    ) = reply
    last_seq = _parse_int(meta[3], keys.meta, "field last_seq", -_SEQ_OFFSET, _SEQ_OFFSET - 1)
    inflight = {
        inflight_flat[n]: _parse_int(
            inflight_flat[n + 1], keys.inflight, f"packet id of {inflight_flat[n]!r}", 0, _PID_MAX
        )
        for n in range(0, len(inflight_flat), 2)
    }
    released = set(released_raw)
    messages: list[StoredMessage] = []
    seen: set[bytes] = set()
    pairs = _unpack_pairs(packed)
    count = len(pairs)
    for n, (seq_raw, value) in enumerate(pairs):
        if seq_raw in seen:
            raise _Damage(keys.queue, f"{seq_raw!r} is both queued and in flight")
        seen.add(seq_raw)
        packet_id = inflight.get(seq_raw)
        if full:
            where = keys.msg
        else:
            where = keys.inflight if n < len(inflight) else keys.queue
            if (packet_id is None) != (n >= len(inflight)):
                raise _Damage(keys.queue, f"{seq_raw!r} is both queued and in flight")
        messages.append(
            _decode_message(keys, where, seq_raw, value, packet_id, seq_raw in released)
        )
    if missing := inflight.keys() - seen:
        raise _Damage(keys.inflight, f"{min(missing)!r} has no message in {_text(keys.msg)}")
    not_in_flight = msg_total - len(inflight)
    if not_in_flight > queue_total:
        reason = f"{not_in_flight - queue_total} messages are neither queued nor in flight"
        raise _Damage(keys.msg, reason)
    if not_in_flight < queue_total:
        reason = f"{queue_total} queued, but only {not_in_flight} messages are not in flight"
        raise _Damage(keys.queue, reason)
    messages.sort(key=attrgetter("seq"))
    state = SessionState(client_id)
    state.messages = {m.seq: m for m in messages}
    if messages:
        last_seq = max(last_seq, messages[-1].seq)
    state.last_seq = last_seq
    state.queued_not_loaded = queue_total - (count - len(inflight))
    state.inbound_qos2 = {
        _parse_int(raw, keys.inbound, "packet id", 0, _PID_MAX) for raw in inbound_raw
    }
    for n in range(0, len(subs_flat), 2):
        topic_filter = _parse_text(subs_flat[n], keys.subs)
        flags = _parse_int(subs_flat[n + 1], keys.subs, f"flags of {topic_filter!r}", 0, 6)
        if flags & 3 == 3:
            raise _Damage(keys.subs, f"flags of {topic_filter!r}: QoS 3")
        state.subscriptions[topic_filter] = StoredSubscription(
            topic_filter, flags & 3, bool(flags & _SUB_CONFIRMED)
        )
    state.pending_unsubscribes = {_parse_text(raw, keys.unsub) for raw in unsub_raw}
    return state
