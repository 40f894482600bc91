-- GET naming one of BENCH_SUBJECTS subjects per request (s-000000, s-000001, ... in
-- rotation, each thread from its own offset); BENCH_SUBJECTS=0 sends a filler header of
-- the same size instead, for the one-token client. done() prints one line for subjects.py.
local n = tonumber(os.getenv("BENCH_SUBJECTS") or "0")
local counter = 0
local threads = {}

setup = function(thread)
  thread:set("offset", #threads * 7919)
  table.insert(threads, thread)
end

request = function()
  counter = counter + 1
  local i = 0
  if n > 0 then i = (counter + offset) % n end
  local name = "x-bench-filler"
  if n > 0 then name = "x-tokenproxy-subject" end
  return wrk.format("GET", nil, { [name] = string.format("s-%06d", i) })
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'JSON:{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
