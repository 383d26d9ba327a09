-- cpsgate shared pools: GCRA over one or more keys, all or none, on the Redis server's clock.
--
-- KEYS[i]       one shared bucket each (a pool, or a trunk configured shared)
-- ARGV[1]       cost: cells to take (> 0), or to give back (< 0)
-- ARGV[2i]      KEYS[i]'s emission interval, integer microseconds
-- ARGV[2i+1]    KEYS[i]'s tolerance, integer microseconds ((burst - 1) * interval)
--
-- A key holds its theoretical arrival time (TAT) in integer microseconds of the server clock;
-- an absent key is a full bucket, and a key expires once its bucket would be full again.
-- Returns {1, 0, 0} when every key admitted (or was refunded), or {0, i, wait} when KEYS[i]
-- refused and would admit in `wait` microseconds; nothing is changed on a refusal.
--
-- Microseconds since 1970 are about 2^51: exact in Lua's doubles, but `tostring` would print
-- them in %.14g (losing the last digits), so they are written with string.format('%.0f'),
-- exact below 2^53 on every build. `TIME` before a write needs effects replication: the
-- default from Redis 5, switched on here for older servers.

if redis.replicate_commands then redis.replicate_commands() end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cost = tonumber(ARGV[1])
local tats = {}

for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i])
  local tolerance = tonumber(ARGV[2 * i + 1])
  -- A value that is not a number (written by something else) counts as a full bucket.
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  if tat < now then tat = now end
  if cost > 0 then
    local ahead = tat - now
    -- Conforms when the cell's own arrival time lies within the tolerance.
    if ahead + interval * (cost - 1) > tolerance then
      return {0, i, ahead + interval * (cost - 1) - tolerance}
    end
  end
  tats[i] = tat + interval * cost
end

for i = 1, #KEYS do
  local tat = tats[i]
  if tat > now then
    -- Keep the key until the bucket is full again (plus a second), then let it go.
    local ms = math.floor((tat - now) / 1000) + 1000
    redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', string.format('%.0f', ms))
  else
    redis.call('DEL', KEYS[i])
  end
end
return {1, 0, 0}
