"""A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager)
started on loopback for the tests, plus a test kubelet that runs pods as local
processes. See docs/dev-cluster.md."""
