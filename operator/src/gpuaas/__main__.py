from gpuaas.cli import main

main()
