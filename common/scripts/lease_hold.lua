--[[
  lease_hold: take a singleton lease, or renew it for its holder (common/lease.py).

  The lease's value is '<owner>:<token>', the token from a counter that only grows, so two
  holders never share a value and a write fenced on the value is refused to a stale holder.

  KEYS[1]: the lease (a string with a TTL)
  KEYS[2]: the token counter
  ARGV[1]: the value this holder was given last time ('' if none)
  ARGV[2]: the holder's owner id
  ARGV[3]: the TTL in milliseconds
  Returns: the value now held by the caller, or false if another holder has the lease.
]]

local current = redis.call('GET', KEYS[1])
if current and current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return current
end
if current then return false end
local value = ARGV[2] .. ':' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
return value
