-- Fenced writes of one meeting's state (SPEC §7.3), atomically.
--
-- KEYS[1] <prefix>meeting:{id}:gen    generation of the last claim/release
-- KEYS[2] <prefix>meeting:{id}:owner  MC id holding that generation; absent once released
-- KEYS[3] <prefix>meeting:{id}:mh     MH assignments payload (opaque bytes)
-- KEYS[4] <prefix>meeting:{id}:state  hash of further meeting state
-- All four share the hash tag {id}, so they live in one cluster slot.
--
-- ARGV[1] operation: 'claim' | 'release' | 'write'
-- ARGV[2] writer's generation: canonical decimal (no sign, no leading zero),
--         up to 20 digits (uint64). Compared as strings, never as Lua numbers,
--         which are doubles and lose precision above 2^53.
-- ARGV[3] writer's MC id (non-empty)
-- claim:   ARGV[4] MH assignments payload
-- release: ARGV[4] milliseconds to keep the generation as a tombstone (0 = forever)
-- write:   ARGV[4..] field, value, field, value, ... for the state hash
--
-- The fence, for every operation: stored generation greater than the
-- writer's -> FENCED_OUT; equal generation held by another MC -> SPLIT_BRAIN;
-- equal generation already released -> FENCED_OUT (a released generation is
-- spent: a late retry of the old assignment must not resurrect the meeting).
--
-- Reply: { outcome, generation_now, owner_now, previous_generation, previous_owner }
-- ('' where there is none). On a refusal *_now is the unchanged stored state.

local op, gen, mc_id = ARGV[1], ARGV[2], ARGV[3]

local function gen_cmp(a, b)
  if #a ~= #b then
    return (#a < #b) and -1 or 1
  end
  if a == b then
    return 0
  end
  return (a < b) and -1 or 1
end

local stored_gen = redis.call('GET', KEYS[1]) or ''
local stored_owner = redis.call('GET', KEYS[2]) or ''

local cmp = 1 -- writer newer than the stored state (or nothing stored)
if stored_gen ~= '' then
  cmp = gen_cmp(gen, stored_gen)
end

local function refuse(outcome)
  return { outcome, stored_gen, stored_owner, '', '' }
end

if cmp < 0 then
  return refuse('FENCED_OUT')
end
if cmp == 0 and stored_owner ~= mc_id then
  if stored_owner == '' then
    if op == 'release' then
      return { 'RELEASED', stored_gen, '', stored_gen, '' } -- idempotent repeat
    end
    return refuse('FENCED_OUT')
  end
  return refuse('SPLIT_BRAIN')
end

-- From here the writer holds the newest generation: equal and its own, or newer.
if op == 'claim' then
  local outcome
  if stored_gen == '' then
    outcome = 'CLAIMED'
  elseif cmp == 0 then
    outcome = 'ALREADY_OWNED'
  else
    outcome = 'TOOK_OVER'
    -- State written under the old generation belongs to the old owner.
    redis.call('DEL', KEYS[4])
  end
  redis.call('SET', KEYS[1], gen)
  redis.call('SET', KEYS[2], mc_id)
  redis.call('SET', KEYS[3], ARGV[4])
  return { outcome, gen, mc_id, stored_gen, stored_owner }
elseif op == 'release' then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
  local ttl = tonumber(ARGV[4])
  if ttl > 0 then
    redis.call('SET', KEYS[1], gen, 'PX', ttl)
  else
    redis.call('SET', KEYS[1], gen)
  end
  return { 'RELEASED', gen, '', stored_gen, stored_owner }
elseif op == 'write' then
  if cmp ~= 0 then
    -- Never claimed at this generation: claim first, so that no state exists
    -- without a recorded owner.
    return refuse('NOT_CLAIMED')
  end
  redis.call('HSET', KEYS[4], unpack(ARGV, 4))
  return { 'WRITTEN', gen, mc_id, stored_gen, stored_owner }
end
return redis.error_reply('ERR fencing.lua: unknown operation')
