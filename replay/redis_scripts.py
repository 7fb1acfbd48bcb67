"""Lua scripts of the Redis store; each runs atomically on the server."""

# Admit a pushed group: KEYS = queue, applied, stats, done-marker, blob keys...;
# ARGV = max_queue_len, group id, policy version, token, chunk count, size, marker ttl.
# Returns the entry id, 'applied' (refused), 'lost' (blobs expired: write them again) or nil (full).
ADMIT = """
local done = redis.call('GET', KEYS[4])
if done then return done end
if redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[3], 'refused_applied', 1)
  return 'applied'
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
for i = 5, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then return 'lost' end
end
for i = 5, #KEYS do redis.call('PERSIST', KEYS[i]) end
local id = redis.call('XADD', KEYS[1], '*', 'gid', ARGV[2], 'pv', ARGV[3], 'token', ARGV[4],
                      'chunks', ARGV[5], 'nbytes', ARGV[6])
redis.call('SET', KEYS[4], id, 'EX', ARGV[7])
redis.call('HINCRBY', KEYS[3], 'pushed', 1)
return id
"""

# Ack a delivery: KEYS = queue, applied, stats, blob keys...; ARGV = consumer group, entry id, group id.
# Returns 1 if this ack applied the group, 0 if it was applied already.
ACK = """
local first = redis.call('SADD', KEYS[2], ARGV[3])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
for i = 4, #KEYS do redis.call('UNLINK', KEYS[i]) end
if first == 1 then redis.call('HINCRBY', KEYS[3], 'acked', 1) end
return first
"""

# Add to the buffer table: KEYS = table, stats, seq counter, blob keys...; ARGV = group id, "token chunks size", cap.
# Returns 1 (added), 0 (already there), -1 (table full), -2 (blobs expired: write them again).
BUFFER_ADD = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
local cap = tonumber(ARGV[3])
if cap > 0 and redis.call('HLEN', KEYS[1]) >= cap then return -1 end
for i = 4, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then return -2 end
end
for i = 4, #KEYS do redis.call('PERSIST', KEYS[i]) end
local seq = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], ARGV[1], seq .. ' ' .. ARGV[2])
redis.call('HINCRBY', KEYS[2], 'buffer_added', 1)
return 1
"""
