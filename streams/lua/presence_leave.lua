-- This gateway's member for a client on a stream goes; the client leaves (announced) when
-- it was its last.
-- KEYS: members, counts, names, index, lingering (see presence_common.lua)
-- ARGV: channel, index_member, stream_json, id_prefix (24 hex digits: event ids are it and
--       a counter), ts_json, announce_max (no events past this many present clients),
--       gateway, client
-- Returns the events announced: 1 when the client left.
local members, counts, names, index = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local lingering = KEYS[5]
local channel, index_member, stream_json = ARGV[1], ARGV[2], ARGV[3]
local id_prefix, ts_json, announce_max = ARGV[4], ARGV[5], tonumber(ARGV[6])
local gateway, client = ARGV[7], ARGV[8]

-- #include presence_common.lua
drop(gateway .. ' ' .. client)
reindex()
return announced
