// A stand-in for nginx (registry.k8s.io/e2e-test-images/nginx, hostnet-nginx) with what critest
// looks at: a process named "nginx" whose command line says "nginx: master process" (critest
// reads /proc/1/cmdline and runs `pidof nginx`), its pid in /var/run/nginx.pid, and HTTP 200 for
// GET / on $NGINX_PORT (default 80), served by a busybox httpd child from /usr/share/nginx/html.
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define TITLE "nginx: master process nginx -g daemon off;"

static volatile pid_t child;

static void on_term(int sig) {
  if (child > 0) kill(child, SIGTERM);
  _exit(sig == SIGQUIT ? 0 : 128 + sig);
}

int main(int argc, char** argv) {
  (void)argc;
  // Re-exec under nginx's process title: the path keeps the kernel's name "nginx", argv[0]
  // becomes the title that /proc/<pid>/cmdline shows.
  if (strcmp(argv[0], TITLE) != 0) {
    char* args[] = {TITLE, NULL};
    execv("/usr/sbin/nginx", args);
    perror("nginx: exec /usr/sbin/nginx");
    return 1;
  }
  const char* port = getenv("NGINX_PORT");
  if (!port || !*port) port = "80";

  FILE* f = fopen("/var/run/nginx.pid", "w");
  if (!f) {
    perror("nginx: /var/run/nginx.pid");
    return 1;
  }
  fprintf(f, "%d\n", (int)getpid());
  fclose(f);

  struct sigaction sa = {0};
  sa.sa_handler = on_term;
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGQUIT, &sa, NULL);

  pid_t pid = fork();
  if (pid < 0) {
    perror("nginx: fork");
    return 1;
  }
  if (pid == 0) {
    execl("/bin/busybox", "httpd", "-f", "-p", port, "-h", "/usr/share/nginx/html", (char*)NULL);
    perror("nginx: exec httpd");
    _exit(127);
  }
  child = pid;
  printf("nginx: master process %d, busybox httpd %d serving /usr/share/nginx/html on port %s\n",
         (int)getpid(), (int)pid, port);
  fflush(stdout);

  // Also PID 1 of its container: reap everything, leave when the server does.
  for (;;) {
    int status;
    pid_t p = wait(&status);
    if (p < 0 && errno == ECHILD) return 1;
    if (p == child) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
}
