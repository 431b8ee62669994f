module todo-mesh/tests/compose/proxycheck

go 1.24
