from caffe_compat.cli.main import main

main()
