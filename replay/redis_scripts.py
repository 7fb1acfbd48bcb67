"""Lua scripts of the Redis store; each runs atomically on the server.

Every script that writes to the queue, the applied set or the buffer first checks the store's run
epoch (replay.store_epoch): under a missing or different epoch it writes nothing and returns 'epoch'.
"""

# Admit a pushed group: KEYS = queue, applied, stats, done-marker, epoch, blob keys...;
# ARGV = max_queue_len, group id, policy version, token, chunk count, size, marker ttl, epoch.
# Returns the entry id, 'applied' (refused), 'lost' (blobs expired: write them again), 'epoch'
# (the store is not this run's) or nil (full).
ADMIT = """
if redis.call('GET', KEYS[5]) ~= ARGV[8] then return 'epoch' end
local done = redis.call('GET', KEYS[4])
if done then return done end
if redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[3], 'refused_applied', 1)
  return 'applied'
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
for i = 6, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then return 'lost' end
end
for i = 6, #KEYS do redis.call('PERSIST', KEYS[i]) end
local id = redis.call('XADD', KEYS[1], '*', 'gid', ARGV[2], 'pv', ARGV[3], 'token', ARGV[4],
                      'chunks', ARGV[5], 'nbytes', ARGV[6])
redis.call('SET', KEYS[4], id, 'EX', ARGV[7])
redis.call('HINCRBY', KEYS[3], 'pushed', 1)
return id
"""

# Ack a delivery: KEYS = queue, applied, stats, epoch, blob keys...; ARGV = consumer group, entry id,
# group id, epoch. Returns 1 if this ack applied the group, 0 if it was applied already, 'epoch'.
ACK = """
if redis.call('GET', KEYS[4]) ~= ARGV[4] then return 'epoch' end
local first = redis.call('SADD', KEYS[2], ARGV[3])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
for i = 5, #KEYS do redis.call('UNLINK', KEYS[i]) end
if first == 1 then redis.call('HINCRBY', KEYS[3], 'acked', 1) end
return first
"""

# Add to the buffer table: KEYS = table, stats, seq counter, epoch, blob keys...;
# ARGV = group id, "token chunks size", cap, epoch.
# Returns 1 (added), 0 (already there), -1 (table full), -2 (blobs expired: write them again), 'epoch'.
BUFFER_ADD = """
if redis.call('GET', KEYS[4]) ~= ARGV[4] then return 'epoch' end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
local cap = tonumber(ARGV[3])
if cap > 0 and redis.call('HLEN', KEYS[1]) >= cap then return -1 end
for i = 5, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then return -2 end
end
for i = 5, #KEYS do redis.call('PERSIST', KEYS[i]) end
local seq = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], ARGV[1], seq .. ' ' .. ARGV[2])
redis.call('HINCRBY', KEYS[2], 'buffer_added', 1)
return 1
"""

# Open the store: KEYS = epoch, queue; ARGV = a new epoch ('' when the caller expects one), consumer group.
# Adopts the epoch there, or, when the store has none and no queue (a new store) and the caller
# expects none, writes the new epoch and creates the queue's stream and consumer group. Returns the
# epoch, or nil (no epoch: a lost store, or a queue from before stores had epochs; the caller decides).
OPEN = """
local epoch = redis.call('GET', KEYS[1])
if epoch then return epoch end
if ARGV[1] == '' or redis.call('EXISTS', KEYS[2]) == 1 then return false end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[2], '0', 'MKSTREAM')
return ARGV[1]
"""
