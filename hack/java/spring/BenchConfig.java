package kite.bench;

import javax.sql.DataSource;
import org.h2.jdbcx.JdbcDataSource;
import org.springframework.context.annotation.Bean;
import org.springframework.jdbc.core.JdbcTemplate;
import org.springframework.web.method.support.CompositeUriComponentsContributor;
import org.springframework.web.servlet.config.annotation.WebMvcConfigurationSupport;
import org.springframework.web.servlet.mvc.method.annotation.RequestMappingHandlerAdapter;

/**
 * The application context: Spring MVC, an H2 database in memory, its repository and the
 * controller. Debian 12's Spring 4.3.30 cannot proxy classes: its CGLIB asks its repackaged ASM
 * for API level 7, which accepts at most 6, so enhancing a @Configuration class (this one, or
 * the DelegatingWebMvcConfiguration that @EnableWebMvc imports) fails. This class is a "lite"
 * configuration instead: @Bean methods without @Configuration, Spring MVC from
 * WebMvcConfigurationSupport (what @EnableWebMvc imports), dependencies as method parameters.
 * In a lite configuration a @Bean method calling another gets a new object, not the bean: the
 * one of WebMvcConfigurationSupport that needs the bean is overridden below.
 */
public class BenchConfig extends WebMvcConfigurationSupport {
    /** Built from the handler adapter bean (the inherited method calls its factory method). */
    @Bean
    @Override
    public CompositeUriComponentsContributor mvcUriComponentsContributor() {
        RequestMappingHandlerAdapter adapter = getApplicationContext().getBean(RequestMappingHandlerAdapter.class);
        return new CompositeUriComponentsContributor(adapter.getArgumentResolvers(), mvcConversionService());
    }

    @Bean
    public DataSource dataSource() {
        JdbcDataSource ds = new JdbcDataSource();
        // In memory, kept while the JVM runs (not only while a connection is open).
        ds.setURL("jdbc:h2:mem:bench;DB_CLOSE_DELAY=-1");
        ds.setUser("sa");
        return ds;
    }

    @Bean
    public JdbcTemplate jdbcTemplate(DataSource dataSource) {
        return new JdbcTemplate(dataSource);
    }

    @Bean
    public GreetingRepository greetingRepository(JdbcTemplate jdbc) {
        return new GreetingRepository(jdbc);
    }

    @Bean
    public GreetingController greetingController(GreetingRepository greetings) {
        return new GreetingController(greetings);
    }
}
