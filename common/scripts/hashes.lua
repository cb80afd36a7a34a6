--[[
  hashes: many hashes (or one field of each) in one reply, e.g. every cell a service keeps.

  A pipeline of HGETALLs would do the same work in Redis, but the client reads each reply of a
  pipeline under its own timeout, which at a thousand cells cost more than Redis's work.

  KEYS[1] (optional): a set of ids; without it, the ids are ARGV[4..]
  ARGV[1]: the key prefix of the hashes (the hash of id is ARGV[1] .. id)
  ARGV[2]: '1' to delete the set once read (take it: what is added later stays for next time)
  ARGV[3]: a field to read of each hash, '' for the whole hash, or '*json' for the whole hash
    as one JSON object (a client then decodes one string a hash, not two a field: for pages of
    thousands of records)
  ARGV[4..]: ids, when there is no KEYS[1]
  Returns: {id, {field, value, ...}} per id ({} for a hash that does not exist), with '*json'
    {id, '{"field": "value", ...}'}, or with a field, {id, value} ('' for absent).
]]

local ids
if #KEYS > 0 then
  ids = redis.call('SMEMBERS', KEYS[1])
else
  ids = {}
  for i = 4, #ARGV do ids[#ids + 1] = ARGV[i] end
end
local out = {}
for _, id in ipairs(ids) do
  if ARGV[3] == '' then
    out[#out + 1] = {id, redis.call('HGETALL', ARGV[1] .. id)}
  elseif ARGV[3] == '*json' then
    local pairs_ = redis.call('HGETALL', ARGV[1] .. id)
    local record = {}
    for i = 1, #pairs_, 2 do record[pairs_[i]] = pairs_[i + 1] end
    -- An empty Lua table encodes as an array: say the object that is meant.
    out[#out + 1] = {id, #pairs_ > 0 and cjson.encode(record) or '{}'}
  else
    out[#out + 1] = {id, redis.call('HGET', ARGV[1] .. id, ARGV[3]) or ''}
  end
end
if #KEYS > 0 and ARGV[2] == '1' then redis.call('DEL', KEYS[1]) end
return out
