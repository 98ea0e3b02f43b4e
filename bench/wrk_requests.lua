-- Replays pre-signed webhook requests, each once: every request carries a unique event id.
-- The file has one request per line: webhook-id \t timestamp \t signature \t body.
-- `thread_id` is a global on purpose: `thread:set` in setup() assigns globals of each thread's
-- Lua state, and a local of the same name would hide it (every thread would replay the same share).
local requests = {}
local index = 0
local threads = {}
local counter = 0

function setup(thread)
  thread:set("thread_id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  assert(thread_id ~= nil, "setup() did not give this thread an id")
  local path = args[1]
  local nthreads = tonumber(args[2])
  local n = 0
  for line in io.lines(path) do
    if n % nthreads == thread_id then
      local id, ts, sig, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
      table.insert(requests, wrk.format("POST", nil, {
        ["Content-Type"] = "application/json",
        ["webhook-id"] = id,
        ["webhook-timestamp"] = ts,
        ["webhook-signature"] = sig,
      }, body))
    end
    n = n + 1
  end
end

function request()
  index = index + 1
  if index > #requests then
    index = 1  -- ran out: repeats are duplicates (200); the report counts them
  end
  return requests[index]
end

local statuses = {}
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  io.write(string.format("RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d errors=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout))
end
