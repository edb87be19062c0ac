-- wrk script: GET one of 1000 pre-written keys. TOKEN from the environment.
local token = os.getenv("TOKEN") or ""
local counter = 0

request = function()
  counter = counter + 1
  return wrk.format("GET", "/v1/memory/seed/k" .. (counter % 1000), {
    ["Authorization"] = "Bearer " .. token,
  })
end

done = function(summary, latency, requests)
  io.write(string.format("RESULT rps=%.0f p50_ms=%.2f p99_ms=%.2f non2xx=%d errors=%d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
