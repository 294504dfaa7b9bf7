from dwm_jax.study.run import main

main()
