// Tools module for etcd: go.etcd.io/etcd/server/v3 carries replace lines, so `go install pkg@v`
// refuses it; as a requirement of this module it builds with the released sibling modules.
module kimi-operator.io/e2e/tools/etcd

go 1.26.0

require go.etcd.io/etcd/server/v3 v3.6.16
