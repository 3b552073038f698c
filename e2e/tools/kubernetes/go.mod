// Tools module for the local control plane's Kubernetes binaries.
// The replace lines for k8s.io/kubernetes' staging modules are generated at build time from the
// go.mod of the release below (kimi_operator.devcluster.build), never hand-written here.
module kimi-operator.io/e2e/tools/kubernetes

go 1.26.0

require k8s.io/kubernetes v1.37.2
