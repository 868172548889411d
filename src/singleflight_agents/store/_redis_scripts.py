"""The Redis store's Lua scripts: every check-and-act on a lease is one of them, one step
on the server (see :mod:`.redis` for the keys they touch)."""

from __future__ import annotations

_NOW_MS = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "
# The receipt as it is when the lease is taken (or found busy) comes back too, as the
# flat field list of HGETALL (-1 if the key is not a hash): the engine's look right after
# taking a lease then costs no round trip, and sees what the holder saw.
ACQUIRE = _NOW_MS + """
local receipt = redis.pcall('HGETALL', KEYS[3])
if type(receipt) ~= 'table' or receipt.err then receipt = -1 end
local lease = redis.call('HMGET', KEYS[1], 'state', 'expires', 'token')
local takeover = 0
if lease[1] == 'held' then
  if tonumber(lease[2]) > now then return {0, tonumber(lease[3]), 0, receipt} end
  takeover = 1
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  -- A lost counter (a restart without persistence) restarts above every token handed out
  -- before it: microseconds of the server's clock.
  redis.call('SET', KEYS[2], now * 1000)
end
local token = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'state', 'held', 'token', token, 'owner', ARGV[1],
           'expires', now + tonumber(ARGV[2]), 'error_type', '', 'error_message', '')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, token, takeover, receipt}
"""
RENEW = _NOW_MS + """
local lease = redis.call('HMGET', KEYS[1], 'state', 'token')
if lease[1] ~= 'held' or lease[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'expires', now + tonumber(ARGV[2]))
return 1
"""
RELEASE = _NOW_MS + """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'expires', now, 'error_type', ARGV[3],
           'error_message', ARGV[4])
redis.call('PUBLISH', ARGV[5], '1')
return 1
"""
PRUNE = _NOW_MS + """
local lease = redis.call('HMGET', KEYS[1], 'state', 'expires')
if lease[1] ~= 'held' or (tonumber(lease[2]) or 0) < now - tonumber(ARGV[1]) then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
PUT = """
local lease = redis.call('HMGET', KEYS[1], 'state', 'token')
if lease[1] ~= 'held' or lease[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('PEXPIREAT', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[1], 'state', 'done')
redis.call('PUBLISH', ARGV[3], '1')
return 1
"""
