/*
 * kite's Spring benchmark app (hack/java-bench-apps.sh builds it from Debian's jars): Spring MVC
 * 4.3 on embedded Jetty 9.4, an annotation-configured context (BenchConfig), and an in-memory
 * H2 database read through JdbcTemplate. It listens on :8080 once the context is up (the
 * DispatcherServlet starts with the server); GET / answers a row of the database as JSON.
 */
package kite.bench;

import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.servlet.ServletContextHandler;
import org.eclipse.jetty.servlet.ServletHolder;
import org.springframework.web.context.support.AnnotationConfigWebApplicationContext;
import org.springframework.web.servlet.DispatcherServlet;

public class SpringBench {
    public static void main(String[] args) throws Exception {
        int port = Integer.getInteger("kite.port", 8080);
        AnnotationConfigWebApplicationContext context = new AnnotationConfigWebApplicationContext();
        context.register(BenchConfig.class);

        ServletHolder dispatcher = new ServletHolder("dispatcher", new DispatcherServlet(context));
        // Initialised when the server starts, not on the first request.
        dispatcher.setInitOrder(1);
        ServletContextHandler handler = new ServletContextHandler();
        handler.setContextPath("/");
        handler.addServlet(dispatcher, "/");

        Server server = new Server(port);
        server.setHandler(handler);
        // The JVM's shutdown hooks run on SIGTERM: stop Jetty (and with it the context) there.
        server.setStopAtShutdown(true);
        server.start();
        System.out.println("spring-bench: ready on " + port + " (java " + Runtime.version() + ")");
        server.join();
    }
}
