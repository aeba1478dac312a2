"""Lua scripts of the Redis store: one per operation that must be atomic across nodes.

Redis runs a script alone, so the registrar's rules (stale CSeq, same push token,
``max-push-devices`` eviction) hold even when two sipwake nodes register the same AOR at
the same moment. A script never re-encodes a binding's JSON (cjson would round the
timestamps): it only decodes it to read fields and stores the text Python gave it.

Key layout (``P`` is the key prefix, ``sipwake:`` by default):

- ``P b:<aor>``      hash: binding key -> ``"<seq> <binding JSON>"``; PEXPIRE at the last
  binding's expiry plus a grace, so Redis forgets an AOR even when no node sweeps.
- ``P exp``          sorted set of ``<aor>\\n<key>`` by expires_at (the expiry sweep, count).
- ``P push``         the same for push bindings only (wake-up pushes).
- ``P t:<provider> <token>`` set of ``<aor>\\n<key>`` using that token (dead tokens).
- ``P seq``          counter: grows with every (re-)registration, gives the order.
- ``P m:<id>``       hash of one held message; ``P ma:<aor>`` its AOR's ids by sequence;
  ``P mexp`` every id by expires_at; ``P mseq`` counter.
- ``P c:<id>``, ``P cs``, ``P cseq``: credentials; ``P a:<id>``, ``P as``, ``P aseq``,
  ``P ai:<AppId>`` (owner), ``P ac:<credential>`` (apps using it): apps.
- ``P r`` hash and ``P ra`` sorted set: rejected token hashes.

Errors go back as ``STALE …``, ``CONFLICT …`` or ``NOTFOUND …`` replies that the Python
side turns into the store's exceptions.
"""

from __future__ import annotations

# Helpers shared by the binding scripts (prepended to each of them).
_BINDING_HELPERS = r"""
local function parse(field, value)
  local sp = string.find(value, " ", 1, true)
  local obj = cjson.decode(string.sub(value, sp + 1))
  local device = field
  if type(obj.instance_id) == "string" and obj.instance_id ~= "" then
    device = obj.instance_id
  end
  local push = nil
  if type(obj.push_key) == "string" then push = obj.push_key end
  local callid = ""
  if type(obj.call_id) == "string" then callid = obj.call_id end
  return {field = field, value = value, seq = tonumber(string.sub(value, 1, sp - 1)),
          reg = tonumber(obj.registered_at), exp = tonumber(obj.expires_at),
          device = device, push = push, callid = callid, cseq = tonumber(obj.cseq) or 0}
end

local function words(text)
  local out = {}
  for w in string.gmatch(text, "[^ ]+") do out[#out + 1] = w end
  return out
end

local function by_seq(a, b) return a.seq < b.seq end

-- Forget one binding of the AOR hash and every index entry pointing at it.
local function drop(prefix, aorkey, aor, b)
  local member = aor .. "\n" .. b.field
  redis.call("HDEL", aorkey, b.field)
  redis.call("ZREM", prefix .. "exp", member)
  if b.push then
    redis.call("ZREM", prefix .. "push", member)
    local w = words(b.push)
    for i = 2, #w do redis.call("SREM", prefix .. "t:" .. w[1] .. " " .. w[i], member) end
  end
end

local function values(list)
  table.sort(list, by_seq)
  local out = {}
  for i, b in ipairs(list) do out[i] = b.value end
  return out
end
"""

# KEYS: none (the AOR decides the keys; a single Redis or a Sentinel-managed primary).
# ARGV: prefix, aor, key, device, registered_at, expires_at, call_id, cseq, json,
#       max_push_devices, grace_ms, node, push_key ("" for none)
UPSERT = (
    _BINDING_HELPERS
    + r"""
local prefix, aor, key, device = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local registered, expires = tonumber(ARGV[5]), tonumber(ARGV[6])
local callid, cseq, json = ARGV[7], tonumber(ARGV[8]), ARGV[9]
local limit, grace, node, pushkey = tonumber(ARGV[10]), tonumber(ARGV[11]), ARGV[12], ARGV[13]
local aorkey = prefix .. "b:" .. aor

local raw = redis.call("HGETALL", aorkey)
local live, expired, previous = {}, {}, nil
for i = 1, #raw, 2 do
  local b = parse(raw[i], raw[i + 1])
  if b.field == key then
    previous = b
  elseif b.exp <= registered then
    expired[#expired + 1] = b
  else
    live[#live + 1] = b
  end
end
-- Every check comes before the first write: a script error does not roll back.
if previous and callid ~= "" and previous.callid == callid and cseq <= previous.cseq then
  return redis.error_reply("STALE CSeq " .. ARGV[8] .. " is not above " ..
    tostring(previous.cseq) .. " of Call-ID " .. callid .. " for this binding")
end
for _, b in ipairs(expired) do drop(prefix, aorkey, aor, b) end

local replaced, kept = {}, {}
local provider, mytokens = nil, {}
if pushkey ~= "" then
  local w = words(pushkey)
  provider = w[1]
  for i = 2, #w do mytokens[w[i]] = true end
end
for _, b in ipairs(live) do
  local shares = false
  if provider and b.push and b.device ~= device then
    local w = words(b.push)
    if w[1] == provider then
      for i = 2, #w do if mytokens[w[i]] then shares = true end end
    end
  end
  if shares then replaced[#replaced + 1] = b else kept[#kept + 1] = b end
end
for _, b in ipairs(replaced) do drop(prefix, aorkey, aor, b) end
if previous then drop(prefix, aorkey, aor, previous) end

local seq = redis.call("INCR", prefix .. "seq")
local value = tostring(seq) .. " " .. json
local member = aor .. "\n" .. key
redis.call("HSET", aorkey, key, value)
redis.call("ZADD", prefix .. "exp", ARGV[6], member)
local ttl = math.ceil((expires - registered) * 1000) + grace
if provider then
  redis.call("ZADD", prefix .. "push", ARGV[6], member)
  for tok, _ in pairs(mytokens) do
    local tkey = prefix .. "t:" .. provider .. " " .. tok
    redis.call("SADD", tkey, member)
    if redis.call("PTTL", tkey) < ttl then redis.call("PEXPIRE", tkey, ttl) end
  end
end

local evicted = {}
if provider and limit > 0 then
  local groups, order = {}, {}
  local me = {field = key, value = value, seq = seq, reg = registered, exp = expires,
              device = device, push = pushkey}
  local candidates = {me}
  for _, b in ipairs(kept) do candidates[#candidates + 1] = b end
  for _, b in ipairs(candidates) do
    if b.push then
      local g = groups[b.device]
      if not g then
        g = {device = b.device, reg = b.reg, seq = b.seq, members = {}}
        groups[b.device] = g
        order[#order + 1] = g
      end
      if b.reg > g.reg then g.reg = b.reg end
      if b.seq > g.seq then g.seq = b.seq end
      g.members[#g.members + 1] = b
    end
  end
  table.sort(order, function(a, b)
    if a.reg ~= b.reg then return a.reg < b.reg end
    return a.seq < b.seq
  end)
  local excess = #order - limit
  for _, g in ipairs(order) do
    if excess <= 0 then break end
    if g.device ~= device then
      table.sort(g.members, by_seq)
      for _, b in ipairs(g.members) do
        drop(prefix, aorkey, aor, b)
        evicted[#evicted + 1] = b
      end
      excess = excess - 1
    end
  end
end

-- Server-side expiry: the AOR lives until its last binding expires, plus the grace.
local last = expires
for _, b in ipairs(kept) do
  if redis.call("HEXISTS", aorkey, b.field) == 1 and b.exp > last then last = b.exp end
end
redis.call("PEXPIRE", aorkey, math.ceil((last - registered) * 1000) + grace)

local kind = "added"
if previous then kind = "refreshed" end
redis.call("PUBLISH", prefix .. "events", node .. "\n" .. kind .. "\n" .. value)
local prev = false
if previous then prev = previous.value end
-- The AOR's live bindings now (the registrar's 200 OK lists them without another read).
local current = {{value = value, seq = seq}}
for _, b in ipairs(kept) do
  if redis.call("HEXISTS", aorkey, b.field) == 1 then current[#current + 1] = b end
end
return {prev, values(replaced), values(evicted), values(expired), values(current)}
"""
)

# ARGV: prefix, aor, key, all ("1": every binding of the AOR, key ignored)
REMOVE = (
    _BINDING_HELPERS
    + r"""
local prefix, aor, key, all = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local aorkey = prefix .. "b:" .. aor
local raw = redis.call("HGETALL", aorkey)
local exact, same_device, every = {}, {}, {}
for i = 1, #raw, 2 do
  local b = parse(raw[i], raw[i + 1])
  every[#every + 1] = b
  if b.field == key then exact[#exact + 1] = b end
  if b.device == key then same_device[#same_device + 1] = b end
end
local gone = exact
if all == "1" then gone = every elseif #exact == 0 then gone = same_device end
for _, b in ipairs(gone) do drop(prefix, aorkey, aor, b) end
return values(gone)
"""
)

# ARGV: prefix, provider, token
REMOVE_BY_TOKEN = (
    _BINDING_HELPERS
    + r"""
local prefix, provider, token = ARGV[1], ARGV[2], ARGV[3]
local tkey = prefix .. "t:" .. provider .. " " .. token
local gone = {}
for _, member in ipairs(redis.call("SMEMBERS", tkey)) do
  local nl = string.find(member, "\n", 1, true)
  local aor, field = string.sub(member, 1, nl - 1), string.sub(member, nl + 1)
  local aorkey = prefix .. "b:" .. aor
  local value = redis.call("HGET", aorkey, field)
  if value then
    local b = parse(field, value)
    drop(prefix, aorkey, aor, b)
    b.aor = aor
    gone[#gone + 1] = b
  end
end
redis.call("DEL", tkey)
return values(gone)
"""
)

# ARGV: prefix, now, batch. Returns {values removed, number of index entries looked at}.
EXPIRE_BINDINGS = (
    _BINDING_HELPERS
    + r"""
local prefix, now, batch = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local members = redis.call("ZRANGEBYSCORE", prefix .. "exp", "-inf", ARGV[2], "LIMIT", 0, batch)
local gone = {}
for _, member in ipairs(members) do
  local nl = string.find(member, "\n", 1, true)
  local aor, field = string.sub(member, 1, nl - 1), string.sub(member, nl + 1)
  local aorkey = prefix .. "b:" .. aor
  local value = redis.call("HGET", aorkey, field)
  if value then
    local b = parse(field, value)
    if b.exp <= now then
      drop(prefix, aorkey, aor, b)
      gone[#gone + 1] = b
    end
  else
    -- Redis already forgot the AOR (server-side expiry): drop the stale index entry.
    redis.call("ZREM", prefix .. "exp", member)
    redis.call("ZREM", prefix .. "push", member)
  end
end
return {values(gone), #members}
"""
)

# ARGV: prefix, now, fraction, offset, batch. Returns {due values, entries looked at}.
DUE_FOR_WAKEUP = (
    _BINDING_HELPERS
    + r"""
local prefix, now, fraction = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local members = redis.call("ZRANGEBYSCORE", prefix .. "push", "(" .. ARGV[2], "+inf",
  "LIMIT", tonumber(ARGV[4]), tonumber(ARGV[5]))
local due = {}
for _, member in ipairs(members) do
  local nl = string.find(member, "\n", 1, true)
  local value = redis.call("HGET", prefix .. "b:" .. string.sub(member, 1, nl - 1),
    string.sub(member, nl + 1))
  if value then
    local b = parse(string.sub(member, nl + 1), value)
    if b.push and b.exp > now and b.reg + (b.exp - b.reg) * fraction <= now then
      due[#due + 1] = b
    end
  end
end
return {values(due), #members}
"""
)

# ARGV: prefix, id, aor, target ("" with has_target "0" for none), has_target, request,
#       received_at, expires_at, grace_ms
ADD_MESSAGE = r"""
local prefix, id, aor = ARGV[1], ARGV[2], ARGV[3]
local mkey = prefix .. "m:" .. id
if redis.call("EXISTS", mkey) == 1 then return id end
local seq = redis.call("INCR", prefix .. "mseq")
redis.call("HSET", mkey, "aor", aor, "request", ARGV[6], "received_at", ARGV[7],
  "expires_at", ARGV[8], "seq", seq)
if ARGV[5] == "1" then redis.call("HSET", mkey, "target", ARGV[4]) end
redis.call("ZADD", prefix .. "ma:" .. aor, seq, id)
redis.call("ZADD", prefix .. "mexp", ARGV[8], id)
local ttl = math.ceil((tonumber(ARGV[8]) - tonumber(ARGV[7])) * 1000) + tonumber(ARGV[9])
if ttl < 1 then ttl = 1 end
redis.call("PEXPIRE", mkey, ttl)
local akey = prefix .. "ma:" .. aor
if redis.call("PTTL", akey) < ttl then redis.call("PEXPIRE", akey, ttl) end
return id
"""

_MESSAGE_FIELDS = r"""
local function fields(mkey, id)
  local h = redis.call("HGETALL", mkey)
  if #h == 0 then return nil end
  h[#h + 1] = "id"
  h[#h + 1] = id
  return h
end
"""

# ARGV: prefix, aor. Returns one flat field/value list per held message, by sequence.
PENDING_MESSAGES = (
    _MESSAGE_FIELDS
    + r"""
local prefix, aor = ARGV[1], ARGV[2]
local out = {}
for _, id in ipairs(redis.call("ZRANGE", prefix .. "ma:" .. aor, 0, -1)) do
  local h = fields(prefix .. "m:" .. id, id)
  if h then out[#out + 1] = h else redis.call("ZREM", prefix .. "ma:" .. aor, id) end
end
return out
"""
)

# ARGV: prefix, id
DELETE_MESSAGE = r"""
local prefix, id = ARGV[1], ARGV[2]
local mkey = prefix .. "m:" .. id
local aor = redis.call("HGET", mkey, "aor")
redis.call("ZREM", prefix .. "mexp", id)
if not aor then return 0 end
redis.call("DEL", mkey)
redis.call("ZREM", prefix .. "ma:" .. aor, id)
return 1
"""

# ARGV: prefix, now, batch. Returns {messages removed (flat lists), entries looked at}.
EXPIRE_MESSAGES = (
    _MESSAGE_FIELDS
    + r"""
local prefix, now, batch = ARGV[1], ARGV[2], tonumber(ARGV[3])
local ids = redis.call("ZRANGEBYSCORE", prefix .. "mexp", "-inf", now, "LIMIT", 0, batch)
local out = {}
for _, id in ipairs(ids) do
  local mkey = prefix .. "m:" .. id
  local h = fields(mkey, id)
  redis.call("ZREM", prefix .. "mexp", id)
  if h then
    out[#out + 1] = h
    redis.call("ZREM", prefix .. "ma:" .. redis.call("HGET", mkey, "aor"), id)
    redis.call("DEL", mkey)
  end
end
return {out, #ids}
"""
)

# ARGV: prefix, id, alias, type, public, sealed secret. Fails when the id exists.
ADD_CREDENTIAL = r"""
local prefix, id = ARGV[1], ARGV[2]
local ckey = prefix .. "c:" .. id
if redis.call("EXISTS", ckey) == 1 then
  return redis.error_reply("CONFLICT credential " .. id .. " already exists")
end
local seq = redis.call("INCR", prefix .. "cseq")
redis.call("HSET", ckey, "alias", ARGV[3], "type", ARGV[4], "public", ARGV[5],
  "secret", ARGV[6], "seq", seq)
redis.call("ZADD", prefix .. "cs", seq, id)
return 1
"""

# ARGV: prefix, id, alias, type, public, has_secret ("0"/"1"), sealed secret
UPDATE_CREDENTIAL = r"""
local prefix, id = ARGV[1], ARGV[2]
local ckey = prefix .. "c:" .. id
if redis.call("EXISTS", ckey) == 0 then
  return redis.error_reply("NOTFOUND credential " .. id .. " not found")
end
redis.call("HSET", ckey, "alias", ARGV[3], "type", ARGV[4], "public", ARGV[5])
if ARGV[6] == "1" then redis.call("HSET", ckey, "secret", ARGV[7]) end
return 1
"""

# ARGV: prefix, id
DELETE_CREDENTIAL = r"""
local prefix, id = ARGV[1], ARGV[2]
local users = redis.call("SMEMBERS", prefix .. "ac:" .. id)
if #users > 0 then
  table.sort(users)
  return redis.error_reply("CONFLICT credential " .. id .. " is used by app(s) " ..
    table.concat(users, ", "))
end
redis.call("ZREM", prefix .. "cs", id)
return redis.call("DEL", prefix .. "c:" .. id)
"""

# ARGV: prefix, mode ("add"/"update"), id, name, provider, data JSON, n app ids,
#       app ids..., credential ids...
SAVE_APP = r"""
local prefix, mode, id = ARGV[1], ARGV[2], ARGV[3]
local akey = prefix .. "a:" .. id
local n = tonumber(ARGV[7])
local exists = redis.call("EXISTS", akey) == 1
if mode == "add" and exists then
  return redis.error_reply("CONFLICT app " .. id .. " already exists")
end
if mode == "update" and not exists then
  return redis.error_reply("NOTFOUND app " .. id .. " not found")
end
for i = 8, 7 + n do
  local owner = redis.call("GET", prefix .. "ai:" .. ARGV[i])
  if owner and owner ~= id then
    return redis.error_reply("CONFLICT AppId " .. ARGV[i] .. " already belongs to app " .. owner)
  end
end
for i = 8 + n, #ARGV do
  if redis.call("EXISTS", prefix .. "c:" .. ARGV[i]) == 0 then
    return redis.error_reply("CONFLICT credential " .. ARGV[i] .. " not found")
  end
end
if exists then
  local old = cjson.decode(redis.call("HGET", akey, "data"))
  for _, ident in ipairs(old.app_ids) do redis.call("DEL", prefix .. "ai:" .. ident) end
  for _, cid in ipairs(old.credential_ids) do redis.call("SREM", prefix .. "ac:" .. cid, id) end
else
  local seq = redis.call("INCR", prefix .. "aseq")
  redis.call("ZADD", prefix .. "as", seq, id)
end
redis.call("HSET", akey, "name", ARGV[4], "provider", ARGV[5], "data", ARGV[6])
for i = 8, 7 + n do redis.call("SET", prefix .. "ai:" .. ARGV[i], id) end
for i = 8 + n, #ARGV do redis.call("SADD", prefix .. "ac:" .. ARGV[i], id) end
return 1
"""

# ARGV: prefix, id
DELETE_APP = r"""
local prefix, id = ARGV[1], ARGV[2]
local akey = prefix .. "a:" .. id
local data = redis.call("HGET", akey, "data")
if not data then return 0 end
local old = cjson.decode(data)
for _, ident in ipairs(old.app_ids) do
  if redis.call("GET", prefix .. "ai:" .. ident) == id then
    redis.call("DEL", prefix .. "ai:" .. ident)
  end
end
for _, cid in ipairs(old.credential_ids) do redis.call("SREM", prefix .. "ac:" .. cid, id) end
redis.call("ZREM", prefix .. "as", id)
redis.call("DEL", akey)
return 1
"""

# ARGV: prefix, before
PURGE_REJECTED = r"""
local prefix = ARGV[1]
local members = redis.call("ZRANGEBYSCORE", prefix .. "ra", "-inf", "(" .. ARGV[2])
for _, m in ipairs(members) do
  redis.call("HDEL", prefix .. "r", m)
  redis.call("ZREM", prefix .. "ra", m)
end
return #members
"""
