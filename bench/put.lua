-- wrk script: PUT a fresh key per request with a JSON value. TOKEN from the environment.
local counter = 0
local token = os.getenv("TOKEN") or ""
local thread_id = 0

function setup(thread)
  thread:set("id", thread_id)
  thread_id = thread_id + 1
end

function init(args)
  prefix = "t" .. id .. "-"
end

request = function()
  counter = counter + 1
  local body = '{"value":{"agent":"memory-systems","step":' .. counter .. ',"note":"observation text observation text"}}'
  return wrk.format("PUT", "/v1/memory/bench/" .. prefix .. counter, {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json",
  }, body)
end

done = function(summary, latency, requests)
  io.write(string.format("RESULT rps=%.0f p50_ms=%.2f p99_ms=%.2f non2xx=%d errors=%d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
