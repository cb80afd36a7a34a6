--[[
  apply: write changes atomically, each only if what it was decided on still holds.

  The decision and every value written (event bodies included) come from the caller; this
  script only compares and writes. A batch of changes is one call: the heartbeat path sends
  every heartbeat of an event-loop turn at once.

  KEYS: none. Each change names its own keys, because one batch spans many records. That is
    fine on one Redis node and its replicas; Redis Cluster would need the keys hash-tagged.
  ARGV[1]: a JSON array of changes, each an object with
    key     the record the change is about (optional): a key written '' below stands for it
    expect  [[key, field, value], ...]   HGET key field (GET key when field is '') must equal
                                         value; '' stands for absent
    newer   [[key, field, number], ...]  number must be above the number in HGET key field
                                         (an absent field is below every number)
    exists  [[key, field], ...]          HEXISTS key field must be 1
    ops     [[command, key, arg, ...], ...]  run in order when every guard holds; command is
                                         one of ALLOWED below, arguments are strings
    read    key (optional)               a hash returned as it was when a guard failed, so
                                         the caller can decide again without another round
                                         trip
    read_fields  [field, ...] (optional) read only these fields of the read hash
    read_always  true (optional)         return the read hash after a write too
  Returns: per change, {1} (or {1, field, value, ...} with read_always) when it was written,
    {0, field, value, ...} when a guard failed (fields only with read).
]]

local ALLOWED = {
  HSET = true, HDEL = true, HINCRBYFLOAT = true, SET = true, DEL = true, SADD = true,
  SREM = true, ZADD = true, ZREM = true, RPUSH = true, LPUSH = true, LTRIM = true, INCRBY = true,
}

local function key_of(change, key)
  if key == '' then return change.key end
  return key
end

local function current(key, field)
  if field == '' then return redis.call('GET', key) or '' end
  return redis.call('HGET', key, field) or ''
end

local function holds(change)
  for _, e in ipairs(change.expect or {}) do
    if current(key_of(change, e[1]), e[2]) ~= e[3] then return false end
  end
  for _, n in ipairs(change.newer or {}) do
    local have = tonumber(current(key_of(change, n[1]), n[2]))
    if have and tonumber(n[3]) <= have then return false end
  end
  for _, e in ipairs(change.exists or {}) do
    if redis.call('HEXISTS', key_of(change, e[1]), e[2]) == 0 then return false end
  end
  return true
end

local function reply(written, change)
  local out = {written}
  if change.read and (written == 0 or change.read_always) then
    if change.read_fields then
      local values = redis.call('HMGET', key_of(change, change.read), unpack(change.read_fields))
      for j, name in ipairs(change.read_fields) do
        if values[j] then
          out[#out + 1] = name
          out[#out + 1] = values[j]
        end
      end
    else
      for _, v in ipairs(redis.call('HGETALL', key_of(change, change.read))) do
      out[#out + 1] = v
    end
    end
  end
  return out
end

local results = {}
for i, change in ipairs(cjson.decode(ARGV[1])) do
  -- Every command is checked before any runs: a script that fails half-way keeps its writes.
  for _, op in ipairs(change.ops or {}) do
    if not ALLOWED[op[1]] then return redis.error_reply('apply: not allowed: ' .. op[1]) end
  end
  if holds(change) then
    for _, op in ipairs(change.ops or {}) do
      op[2] = key_of(change, op[2])
      redis.call(unpack(op))
    end
    results[i] = reply(1, change)
  else
    results[i] = reply(0, change)
  end
end
return results
