/*
 * kite's Java test app: a small HTTP service on :8080 that touches the parts of the JDK a
 * service's start does (XML, regex, streams, java.time, logging, the HTTP server) so its
 * class archive has something to hold. GET / answers "hello <feature> <-Dkite.greeting>".
 */
import com.sun.net.httpserver.HttpServer;
import java.io.ByteArrayInputStream;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.time.ZonedDateTime;
import java.time.format.DateTimeFormatter;
import java.util.concurrent.Executors;
import java.util.logging.Logger;
import java.util.regex.Pattern;
import java.util.stream.Collectors;
import java.util.stream.IntStream;
import javax.xml.parsers.DocumentBuilderFactory;

public class KiteHello {
    public static void main(String[] args) throws Exception {
        Logger log = Logger.getLogger("kite");
        var doc = DocumentBuilderFactory.newInstance().newDocumentBuilder()
            .parse(new ByteArrayInputStream("<app><name>hello</name></app>".getBytes(StandardCharsets.UTF_8)));
        String name = doc.getDocumentElement().getElementsByTagName("name").item(0).getTextContent();
        String nums = IntStream.range(0, 10).mapToObj(Integer::toString).collect(Collectors.joining(","));
        boolean ok = Pattern.compile("[0-9,]+").matcher(nums).matches();
        String when = DateTimeFormatter.ISO_OFFSET_DATE_TIME.format(ZonedDateTime.now());
        HttpServer server = HttpServer.create(new InetSocketAddress(8080), 0);
        server.setExecutor(Executors.newFixedThreadPool(2));
        server.createContext("/", ex -> {
            String greeting = System.getProperty("kite.greeting", "");
            byte[] body = (name + " " + Runtime.version().feature() + " " + greeting).trim().concat("\n")
                .getBytes(StandardCharsets.UTF_8);
            ex.sendResponseHeaders(200, body.length);
            try (OutputStream os = ex.getResponseBody()) { os.write(body); }
        });
        server.start();
        log.info(String.format("%s ready on 8080 (java %s, %s, %s)", name, Runtime.version(), ok, when));
    }
}
