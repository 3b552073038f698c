// Tools module for gopher-lua, the Lua VM Argo CD runs resource health checks in; the e2e tests
// run the chart's health check in it.
module kimi-operator.io/e2e/tools/lua

go 1.26.0

require github.com/yuin/gopher-lua v1.1.2
