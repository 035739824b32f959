# envelope: from=alice@example.org to=customer@example.com message=messages/multipart.eml
require ["fileinto", "body"];
if body :content "application/pdf" :contains "SECRETPDF" {
  fileinto "yes";
} else {
  fileinto "no";
}
