// Tools module for Helm, used by the e2e tests to lint and render the chart.
module kimi-operator.io/e2e/tools/helm

go 1.26.0

require helm.sh/helm/v3 v3.22.0
