module todo-mesh/loadgen

go 1.22
